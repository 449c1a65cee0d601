//! Lines of a child's stderr, for its log.
//!
//! `tokio_util`'s `LinesCodec` ends the stream after its first error (an
//! over-long line, invalid UTF-8), and a stderr nobody reads blocks the child
//! as soon as the pipe fills. This decoder has no error: invalid UTF-8 is
//! replaced, and a line longer than `max` bytes is **cut**: its first `max`
//! bytes are kept, followed by [`CUT_MARK`], and the rest of it, up to the
//! next newline, is dropped as it arrives. So a child that writes 10 MB
//! without a newline costs one line of `max` bytes, not 10 MB of memory and
//! not hundreds of pieces that would push every earlier line out of its log.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Appended to a line that was cut at the maximum length.
pub const CUT_MARK: &str = " …[cut]";

/// Splits bytes into lines of at most `max` bytes; never fails.
#[derive(Debug, Clone, Copy)]
pub struct LogLines {
    max: usize,
    scanned: usize,
    /// A line was cut: its rest is dropped up to the next newline.
    skipping: bool,
}

impl LogLines {
    /// Lines of at most `max` bytes (longer ones are cut).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            scanned: 0,
            skipping: false,
        }
    }

    fn take(&mut self, src: &mut BytesMut, len: usize, skip: usize) -> String {
        let line = src.split_to(len);
        src.advance(skip);
        self.scanned = 0;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        String::from_utf8_lossy(line).into_owned()
    }
}

impl Decoder for LogLines {
    type Item = String;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<String>> {
        if self.skipping {
            match src.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    src.advance(i + 1);
                    self.skipping = false;
                    self.scanned = 0;
                }
                None => {
                    src.clear();
                    return Ok(None);
                }
            }
        }
        // A line of exactly `max` bytes has its newline at `max`.
        let end = src.len().min(self.max + 1);
        let from = self.scanned.min(end);
        if let Some(i) = src[from..end].iter().position(|&b| b == b'\n') {
            return Ok(Some(self.take(src, from + i, 1)));
        }
        if src.len() > self.max {
            let max = self.max;
            let mut line = self.take(src, max, 0);
            line.push_str(CUT_MARK);
            self.skipping = true;
            // What came after the cut in this same read.
            if let Some(i) = src.iter().position(|&b| b == b'\n') {
                src.advance(i + 1);
                self.skipping = false;
            } else {
                src.clear();
            }
            return Ok(Some(line));
        }
        self.scanned = src.len();
        Ok(None)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> std::io::Result<Option<String>> {
        if let Some(line) = self.decode(src)? {
            return Ok(Some(line));
        }
        if src.is_empty() || self.skipping {
            src.clear();
            return Ok(None);
        }
        let len = src.len();
        Ok(Some(self.take(src, len, 0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<String> {
        let mut codec = LogLines::new(max);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(line) = codec.decode_eof(&mut buf).expect("never fails") {
            out.push(line);
        }
        out
    }

    #[test]
    fn splits_lines_cuts_long_ones_and_replaces_bad_utf8() {
        assert_eq!(lines(b"a\nbc\r\n\nlast", 100), ["a", "bc", "", "last"]);
        let cut = format!("abc{CUT_MARK}");
        assert_eq!(lines(b"abcdefg\nh", 3), [cut.as_str(), "h"]);
        assert_eq!(lines(b"abc\nh", 3), ["abc", "h"], "exactly max is whole");
        assert_eq!(lines(b"\xff\xfeok\n", 100), ["\u{fffd}\u{fffd}ok"]);
    }

    #[test]
    fn resumes_scanning_where_it_stopped() {
        let mut codec = LogLines::new(100);
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(codec.decode(&mut buf).expect("ok"), None);
        buf.extend_from_slice(b"def\nx");
        assert_eq!(
            codec.decode(&mut buf).expect("ok").as_deref(),
            Some("abcdef")
        );
        assert_eq!(codec.decode(&mut buf).expect("ok"), None);
    }

    #[test]
    fn a_huge_line_without_newline_costs_one_cut_line_and_no_memory() {
        let mut codec = LogLines::new(16);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        // 10 MB in 64 KiB reads, no newline until the very end.
        for _ in 0..160 {
            buf.extend_from_slice(&[b'x'; 65536]);
            while let Some(line) = codec.decode(&mut buf).expect("ok") {
                out.push(line);
            }
            assert!(buf.len() <= 16, "the rest is dropped as it comes");
        }
        buf.extend_from_slice(b"xxx\nnext\n");
        while let Some(line) = codec.decode_eof(&mut buf).expect("ok") {
            out.push(line);
        }
        assert_eq!(
            out,
            [format!("{}{CUT_MARK}", "x".repeat(16)), "next".into()]
        );
    }
}
