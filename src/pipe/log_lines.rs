//! Lines of a child's stderr, for the log.
//!
//! `tokio_util`'s `LinesCodec` ends the stream after its first error (an
//! over-long line, invalid UTF-8), and a stderr nobody reads blocks the child
//! as soon as the pipe fills. This decoder has no error: long lines are cut
//! into `max` byte pieces and invalid UTF-8 is replaced.

use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// Splits bytes into lines of at most `max` bytes; never fails.
#[derive(Debug, Clone, Copy)]
pub struct LogLines {
    max: usize,
    scanned: usize,
}

impl LogLines {
    /// Lines of at most `max` bytes (longer ones are split).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            scanned: 0,
        }
    }

    fn take(&mut self, src: &mut BytesMut, len: usize, skip: usize) -> String {
        let line = src.split_to(len);
        let _ = src.split_to(skip);
        self.scanned = 0;
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        String::from_utf8_lossy(line).into_owned()
    }
}

impl Decoder for LogLines {
    type Item = String;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<String>> {
        let end = src.len().min(self.max);
        if let Some(i) = src[self.scanned.min(end)..end]
            .iter()
            .position(|&b| b == b'\n')
        {
            let at = self.scanned.min(end) + i;
            return Ok(Some(self.take(src, at, 1)));
        }
        if src.len() >= self.max {
            let max = self.max;
            return Ok(Some(self.take(src, max, 0)));
        }
        self.scanned = src.len();
        Ok(None)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> std::io::Result<Option<String>> {
        if let Some(line) = self.decode(src)? {
            return Ok(Some(line));
        }
        if src.is_empty() {
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
        assert_eq!(lines(b"abcdefg\nh", 3), ["abc", "def", "g", "h"]);
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
}
