//! The slice of MessagePack the envelope needs, read and written by hand.
//!
//! Why not serde for the envelope: the broker must carry `payload` as the exact
//! bytes it arrived in and never build it. serde has no "raw value" for
//! MessagePack, so the envelope reader walks the map itself, records the byte
//! span of `payload` (skipping it without allocating, iteratively so that deep
//! nesting cannot exhaust the stack) and hands strings out as spans too. Marker
//! classification comes from `rmp`; typed payloads still go through `rmp-serde`.

use rmp::Marker;
use std::ops::Range;

/// Why a byte sequence is not well-formed MessagePack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    /// The value promises more bytes than the frame holds.
    #[error("value truncated at byte {offset}")]
    Truncated {
        /// Where the missing bytes should have been.
        offset: usize,
    },
    /// 0xc1 is never used by MessagePack.
    #[error("reserved marker 0xc1 at byte {offset}")]
    Reserved {
        /// Where the marker is.
        offset: usize,
    },
}

/// What kind of value a marker byte starts; used in error messages.
pub(crate) fn kind_name(marker: u8) -> &'static str {
    match Marker::from_u8(marker) {
        Marker::Null => "nil",
        Marker::True | Marker::False => "bool",
        Marker::FixPos(_) | Marker::U8 | Marker::U16 | Marker::U32 | Marker::U64 => "uint",
        Marker::FixNeg(_) | Marker::I8 | Marker::I16 | Marker::I32 | Marker::I64 => "int",
        Marker::F32 | Marker::F64 => "float",
        Marker::FixStr(_) | Marker::Str8 | Marker::Str16 | Marker::Str32 => "str",
        Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => "bin",
        Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => "array",
        Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => "map",
        Marker::FixExt1
        | Marker::FixExt2
        | Marker::FixExt4
        | Marker::FixExt8
        | Marker::FixExt16
        | Marker::Ext8
        | Marker::Ext16
        | Marker::Ext32 => "ext",
        Marker::Reserved => "reserved",
    }
}

/// A forward-only cursor over one frame. Never allocates.
///
/// Works on raw marker bytes (classifying a byte is a range check) rather
/// than `rmp::Marker`, which costs a conversion per value on the hot path.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// Marker bytes (MessagePack spec) the reader handles by name.
pub(crate) mod m {
    pub const NIL: u8 = 0xc0;
    pub const RESERVED: u8 = 0xc1;
    pub const FALSE: u8 = 0xc2;
    pub const TRUE: u8 = 0xc3;
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<Range<usize>, MsgpackError> {
        if n > self.remaining() {
            return Err(MsgpackError::Truncated { offset: self.pos });
        }
        let start = self.pos;
        self.pos += n;
        Ok(start..self.pos)
    }

    #[inline(always)]
    fn be<const N: usize>(&mut self) -> Result<u64, MsgpackError> {
        let range = self.take(N)?;
        let mut bytes = [0u8; 8];
        bytes[8 - N..].copy_from_slice(&self.buf[range]);
        Ok(u64::from_be_bytes(bytes))
    }

    /// If the next bytes are `expected` (an encoded key), steps over them.
    #[inline(always)]
    pub(crate) fn eat(&mut self, expected: &[u8]) -> bool {
        let found = self.buf[self.pos..].starts_with(expected);
        if found {
            self.pos += expected.len();
        }
        found
    }

    /// Reads the next marker byte; 0xc1 (never used by MessagePack) is an error.
    #[inline(always)]
    pub(crate) fn marker(&mut self) -> Result<u8, MsgpackError> {
        let Some(&byte) = self.buf.get(self.pos) else {
            return Err(MsgpackError::Truncated { offset: self.pos });
        };
        if byte == m::RESERVED {
            return Err(MsgpackError::Reserved { offset: self.pos });
        }
        self.pos += 1;
        Ok(byte)
    }

    /// If `marker` starts a str, reads its body and returns the span.
    #[inline(always)]
    pub(crate) fn str_body(&mut self, marker: u8) -> Result<Option<Range<usize>>, MsgpackError> {
        let len = match marker {
            0xa0..=0xbf => usize::from(marker & 0x1f),
            0xd9 => self.be::<1>()? as usize,
            0xda => self.be::<2>()? as usize,
            0xdb => self.be::<4>()? as usize,
            _ => return Ok(None),
        };
        self.take(len).map(Some)
    }

    /// If `marker` starts an integer, reads it. `Some(None)` is a negative int.
    #[inline(always)]
    pub(crate) fn uint_body(&mut self, marker: u8) -> Result<Option<Option<u64>>, MsgpackError> {
        let non_negative = |v: i64| u64::try_from(v).ok();
        Ok(Some(match marker {
            0x00..=0x7f => Some(u64::from(marker)),
            0xcc => Some(self.be::<1>()?),
            0xcd => Some(self.be::<2>()?),
            0xce => Some(self.be::<4>()?),
            0xcf => Some(self.be::<8>()?),
            0xe0..=0xff => None,
            0xd0 => non_negative(i64::from(self.be::<1>()? as u8 as i8)),
            0xd1 => non_negative(i64::from(self.be::<2>()? as u16 as i16)),
            0xd2 => non_negative(i64::from(self.be::<4>()? as u32 as i32)),
            0xd3 => non_negative(self.be::<8>()? as i64),
            _ => return Ok(None),
        }))
    }

    /// If `marker` starts a map, reads its entry count.
    #[inline]
    pub(crate) fn map_len(&mut self, marker: u8) -> Result<Option<usize>, MsgpackError> {
        Ok(Some(match marker {
            0x80..=0x8f => usize::from(marker & 0x0f),
            0xde => self.be::<2>()? as usize,
            0xdf => self.be::<4>()? as usize,
            _ => return Ok(None),
        }))
    }

    /// Skips the body of a value whose marker was just read.
    ///
    /// Iterative: `pending` counts values still to skip, so nesting depth costs
    /// no stack. Each value needs at least one byte, so a count larger than
    /// what is left is a truncated frame: that bound keeps the loop linear in
    /// the frame size whatever lengths the headers claim. The common one-byte
    /// markers (fixstr, fixint, fixmap, fixarray, nil, bool) take the fast arm;
    /// a 20 KB payload is about a thousand values, so this loop is what a
    /// relay of a large envelope costs.
    pub(crate) fn skip_body(&mut self, marker: u8) -> Result<(), MsgpackError> {
        // Position in a local: the loop stays in registers.
        let buf = self.buf;
        let end = buf.len();
        let mut pos = self.pos;
        let mut pending: usize = 0;
        let mut marker = marker;
        loop {
            match marker {
                0xa0..=0xbf => pos += usize::from(marker & 0x1f),
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => {}
                0x80..=0x8f => pending += 2 * usize::from(marker & 0x0f),
                0x90..=0x9f => pending += usize::from(marker & 0x0f),
                _ => {
                    self.pos = pos;
                    let (skip, children) = self.sized_body(marker)?;
                    pos = self.pos.saturating_add(skip);
                    pending = pending.saturating_add(children);
                }
            }
            // One check covers both a body running past the end and more
            // pending values than bytes left.
            if pos > end || pending > end - pos {
                self.pos = pos.min(end);
                return Err(MsgpackError::Truncated { offset: self.pos });
            }
            if pending == 0 {
                self.pos = pos;
                return Ok(());
            }
            pending -= 1;
            // In bounds: at least `pending` (>= 1) bytes are left. The
            // reserved marker 0xc1 takes the sized arm, which refuses it.
            marker = buf[pos];
            pos += 1;
        }
    }

    /// For markers with a length or count after them: bytes of body to skip,
    /// and child values to skip after that.
    fn sized_body(&mut self, marker: u8) -> Result<(usize, usize), MsgpackError> {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Ok(match marker {
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xca | 0xce | 0xd2 => (4, 0),
            0xcb | 0xcf | 0xd3 => (8, 0),
            0xc4 | 0xd9 => (n(self.be::<1>()?), 0),
            0xc5 | 0xda => (n(self.be::<2>()?), 0),
            0xc6 | 0xdb => (n(self.be::<4>()?), 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xc7 => (n(self.be::<1>()?).saturating_add(1), 0),
            0xc8 => (n(self.be::<2>()?).saturating_add(1), 0),
            0xc9 => (n(self.be::<4>()?).saturating_add(1), 0),
            0xdc => (0, n(self.be::<2>()?)),
            0xdd => (0, n(self.be::<4>()?)),
            0xde => (0, n(self.be::<2>()?).saturating_mul(2)),
            0xdf => (0, n(self.be::<4>()?).saturating_mul(2)),
            // The one-byte markers are handled by the caller; 0xc1 is the
            // only byte left: `skip_body` passes it here to be refused.
            _ => {
                return Err(MsgpackError::Reserved {
                    offset: self.pos.saturating_sub(1),
                });
            }
        })
    }

    /// Skips one whole value and returns its span.
    pub(crate) fn value_span(&mut self) -> Result<Range<usize>, MsgpackError> {
        let start = self.pos;
        let marker = self.marker()?;
        self.skip_body(marker)?;
        Ok(start..self.pos)
    }
}

/// Checks that `bytes` hold exactly one well-formed MessagePack value.
/// Returns the number of trailing bytes as an error if there are any.
pub(crate) fn check_single_value(bytes: &[u8]) -> Result<(), SingleValueError> {
    let mut reader = Reader::new(bytes);
    reader.value_span()?;
    match reader.remaining() {
        0 => Ok(()),
        n => Err(SingleValueError::Trailing(n)),
    }
}

/// Why a byte string is not exactly one MessagePack value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SingleValueError {
    /// Not well-formed MessagePack.
    #[error(transparent)]
    Malformed(#[from] MsgpackError),
    /// More than one value: this many bytes follow the first.
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
}

// ---- writing -------------------------------------------------------------

/// Bytes of a map's header (an array's is the same size).
pub(crate) fn map_header_len(entries: usize) -> usize {
    match entries {
        0..=15 => 1,
        16..=0xffff => 3,
        _ => 5,
    }
}

pub(crate) fn str_len(s: &str) -> usize {
    let header = match s.len() {
        0..=31 => 1,
        32..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    };
    header + s.len()
}

pub(crate) fn uint_len(v: u64) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// Writes into a slice sized in advance with the `*_len` functions above: each
/// write is a bounds-checked copy instead of a buffer's capacity check and an
/// out-of-line `memcpy`, which is most of the cost of a small envelope.
pub(crate) struct SliceWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> SliceWriter<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> usize {
        self.pos
    }

    #[inline]
    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
    }

    #[inline]
    pub(crate) fn map_header(&mut self, entries: usize) {
        self.header(entries, [0x80, 0xde, 0xdf]);
    }

    /// An array's header; its size is [`map_header_len`]'s, as for a map.
    #[inline]
    pub(crate) fn array_header(&mut self, len: usize) {
        self.header(len, [0x90, 0xdc, 0xdd]);
    }

    /// A map or array header: the fix marker with the count, or the 16- or
    /// 32-bit marker and the count after it.
    #[inline]
    fn header(&mut self, n: usize, [fix, x16, x32]: [u8; 3]) {
        match n {
            0..=15 => self.bytes(&[fix | n as u8]),
            16..=0xffff => {
                self.bytes(&[x16]);
                self.bytes(&(n as u16).to_be_bytes());
            }
            _ => {
                self.bytes(&[x32]);
                self.bytes(&(n as u32).to_be_bytes());
            }
        }
    }

    /// Writes a str. Lengths past `u32::MAX` cannot occur: frames are capped
    /// far below that and the encoder checks the total first.
    #[inline]
    pub(crate) fn str(&mut self, s: &str) {
        let n = s.len();
        match n {
            0..=31 => self.bytes(&[0xa0 | n as u8]),
            32..=0xff => self.bytes(&[0xd9, n as u8]),
            0x100..=0xffff => {
                self.bytes(&[0xda]);
                self.bytes(&(n as u16).to_be_bytes());
            }
            _ => {
                self.bytes(&[0xdb]);
                self.bytes(&(n as u32).to_be_bytes());
            }
        }
        self.bytes(s.as_bytes());
    }

    /// Writes an unsigned int in its shortest form (as every msgpack library does).
    #[inline]
    pub(crate) fn uint(&mut self, v: u64) {
        match v {
            0..=0x7f => self.bytes(&[v as u8]),
            0x80..=0xff => self.bytes(&[0xcc, v as u8]),
            0x100..=0xffff => {
                self.bytes(&[0xcd]);
                self.bytes(&(v as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.bytes(&[0xce]);
                self.bytes(&(v as u32).to_be_bytes());
            }
            _ => {
                self.bytes(&[0xcf]);
                self.bytes(&v.to_be_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(bytes: &[u8]) -> Result<usize, MsgpackError> {
        let mut r = Reader::new(bytes);
        r.value_span().map(|s| s.end)
    }

    fn write(len: usize, f: impl FnOnce(&mut SliceWriter<'_>)) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut w = SliceWriter::new(&mut buf);
        f(&mut w);
        assert_eq!(w.written(), len, "length function and writer disagree");
        buf
    }

    #[test]
    fn writers_match_rmp_and_their_length_functions() {
        for v in [
            0u64,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let ours = write(uint_len(v), |w| w.uint(v));
            let mut theirs = Vec::new();
            rmp::encode::write_uint(&mut theirs, v).expect("vec write");
            assert_eq!(ours, theirs, "uint {v}");
            assert_eq!(ours.len(), uint_len(v));
        }
        for n in [0usize, 31, 32, 255, 256, 65535, 65536] {
            let s = "x".repeat(n);
            let ours = write(str_len(&s), |w| w.str(&s));
            let mut theirs = Vec::new();
            rmp::encode::write_str(&mut theirs, &s).expect("vec write");
            assert_eq!(ours, theirs, "str of {n}");
            assert_eq!(ours.len(), str_len(&s));
        }
        for n in [0usize, 15, 16, 65535, 65536] {
            let ours = write(map_header_len(n), |w| w.map_header(n));
            let mut theirs = Vec::new();
            rmp::encode::write_map_len(&mut theirs, n as u32).expect("vec write");
            assert_eq!(ours, theirs, "map of {n}");
            assert_eq!(ours.len(), map_header_len(n));
        }
    }

    #[test]
    fn skip_handles_every_kind_and_nesting() {
        let value = rmpv::Value::Array(vec![
            rmpv::Value::Nil,
            rmpv::Value::from(-5),
            rmpv::Value::from(u64::MAX),
            rmpv::Value::F32(1.5),
            rmpv::Value::from("hé"),
            rmpv::Value::Binary(vec![0, 1, 2]),
            rmpv::Value::Ext(7, vec![1; 16]),
            rmpv::Value::Ext(7, vec![1; 3]),
            rmpv::Value::Map(vec![(rmpv::Value::from(1), rmpv::Value::from(true))]),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &value).expect("vec write");
        assert_eq!(skip(&bytes), Ok(bytes.len()));
        for cut in 0..bytes.len() {
            assert!(
                matches!(skip(&bytes[..cut]), Err(MsgpackError::Truncated { .. })),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn skip_is_iterative_and_rejects_lying_lengths() {
        // 100 000 nested one-element arrays: recursion would overflow the stack.
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        assert_eq!(skip(&deep), Ok(deep.len()));
        // An array32 that claims 4 billion elements in 5 bytes fails at once.
        assert_eq!(
            skip(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(MsgpackError::Truncated { offset: 5 })
        );
        assert_eq!(
            skip(&[0x91, 0xc1]),
            Err(MsgpackError::Reserved { offset: 1 })
        );
        // After other values, as a map's value: still named where it is.
        assert_eq!(
            skip(&[0x82, 0xa1, b'k', 0x01, 0xa1, b'v', 0xc1]),
            Err(MsgpackError::Reserved { offset: 6 })
        );
        assert_eq!(
            check_single_value(&[0xc0, 0xc0]),
            Err(SingleValueError::Trailing(1))
        );
    }

    /// The MessagePack grammar spelled out marker by marker (through
    /// `rmp::Marker`), recursively: what the skip loop must agree with.
    /// `Err` for a truncated value or the reserved marker.
    fn reference_skip(buf: &[u8], pos: &mut usize) -> Result<(), ()> {
        fn take(buf: &[u8], pos: &mut usize, n: usize) -> Result<(), ()> {
            if buf.len() - *pos < n {
                return Err(());
            }
            *pos += n;
            Ok(())
        }
        fn len(buf: &[u8], pos: &mut usize, n: usize) -> Result<usize, ()> {
            let start = *pos;
            take(buf, pos, n)?;
            Ok(buf[start..*pos]
                .iter()
                .fold(0usize, |v, &b| (v << 8) | usize::from(b)))
        }
        fn values(buf: &[u8], pos: &mut usize, n: usize) -> Result<(), ()> {
            (0..n).try_for_each(|_| reference_skip(buf, pos))
        }
        let marker = *buf.get(*pos).ok_or(())?;
        *pos += 1;
        use Marker::*;
        match Marker::from_u8(marker) {
            FixPos(_) | FixNeg(_) | Null | True | False => Ok(()),
            U8 | I8 => take(buf, pos, 1),
            U16 | I16 => take(buf, pos, 2),
            U32 | I32 | F32 => take(buf, pos, 4),
            U64 | I64 | F64 => take(buf, pos, 8),
            FixStr(n) => take(buf, pos, usize::from(n)),
            Str8 | Bin8 => len(buf, pos, 1).and_then(|n| take(buf, pos, n)),
            Str16 | Bin16 => len(buf, pos, 2).and_then(|n| take(buf, pos, n)),
            Str32 | Bin32 => len(buf, pos, 4).and_then(|n| take(buf, pos, n)),
            FixExt1 => take(buf, pos, 2),
            FixExt2 => take(buf, pos, 3),
            FixExt4 => take(buf, pos, 5),
            FixExt8 => take(buf, pos, 9),
            FixExt16 => take(buf, pos, 17),
            Ext8 => len(buf, pos, 1).and_then(|n| take(buf, pos, n + 1)),
            Ext16 => len(buf, pos, 2).and_then(|n| take(buf, pos, n + 1)),
            Ext32 => len(buf, pos, 4).and_then(|n| take(buf, pos, n + 1)),
            FixArray(n) => values(buf, pos, usize::from(n)),
            Array16 => len(buf, pos, 2).and_then(|n| values(buf, pos, n)),
            Array32 => len(buf, pos, 4).and_then(|n| values(buf, pos, n)),
            FixMap(n) => values(buf, pos, 2 * usize::from(n)),
            Map16 => len(buf, pos, 2).and_then(|n| values(buf, pos, 2 * n)),
            Map32 => len(buf, pos, 4).and_then(|n| values(buf, pos, 2 * n)),
            Reserved => Err(()),
        }
    }

    proptest::proptest! {
        /// Any bytes, biased towards markers that nest and carry lengths:
        /// the skip accepts exactly what the grammar does, and ends where it
        /// does.
        #[test]
        fn skip_agrees_with_the_grammar(bytes in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::any::<u8>(),
                proptest::sample::select(vec![
                    0x00u8, 0x81, 0x92, 0xa2, 0xc0, 0xc1, 0xc4, 0xc7, 0xcd, 0xd4,
                    0xd8, 0xd9, 0xdc, 0xde, 0xdd, 0xdf, 0x01, 0x02,
                ]),
            ],
            0..48,
        )) {
            let mut end = 0;
            let theirs = reference_skip(&bytes, &mut end).map(|()| end);
            proptest::prop_assert_eq!(skip(&bytes).ok(), theirs.ok());
        }
    }

    #[test]
    fn uint_accepts_non_negative_signed_forms() {
        let read = |bytes: &[u8]| {
            let mut r = Reader::new(bytes);
            let m = r.marker().expect("marker");
            r.uint_body(m)
        };
        assert_eq!(read(&[0xd0, 0x05]), Ok(Some(Some(5))));
        assert_eq!(read(&[0xd0, 0xfb]), Ok(Some(None)));
        assert_eq!(read(&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]), Ok(Some(None)));
        assert_eq!(
            read(&[0xd3, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok(Some(Some(i64::MAX as u64)))
        );
        assert_eq!(
            read(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Ok(Some(Some(u64::MAX)))
        );
        assert_eq!(read(&[0xcd, 0x01, 0x00]), Ok(Some(Some(256))));
        assert_eq!(read(&[0xc0]), Ok(None));
    }
}
