//! The slice of MessagePack the envelope needs, read and written by hand.
//!
//! Why not serde for the envelope: the broker must carry `payload` as the exact
//! bytes it arrived in and never build it. serde has no "raw value" for
//! MessagePack, so the envelope reader walks the map itself, records the byte
//! span of `payload` (skipping it without allocating, iteratively so that deep
//! nesting cannot exhaust the stack) and hands strings out as spans too. Marker
//! classification comes from `rmp`; typed payloads still go through `rmp-serde`.

use bytes::BufMut;
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

/// What kind of value a marker starts; used in error messages.
pub(crate) fn kind_name(marker: Marker) -> &'static str {
    match marker {
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
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
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

    fn take(&mut self, n: usize) -> Result<Range<usize>, MsgpackError> {
        if n > self.remaining() {
            return Err(MsgpackError::Truncated { offset: self.pos });
        }
        let start = self.pos;
        self.pos += n;
        Ok(start..self.pos)
    }

    fn be(&mut self, n: usize) -> Result<u64, MsgpackError> {
        let range = self.take(n)?;
        Ok(self.buf[range]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// Reads the next marker byte.
    pub(crate) fn marker(&mut self) -> Result<Marker, MsgpackError> {
        let offset = self.pos;
        let range = self.take(1)?;
        match Marker::from_u8(self.buf[range.start]) {
            Marker::Reserved => Err(MsgpackError::Reserved { offset }),
            m => Ok(m),
        }
    }

    /// If `marker` starts a str, reads its body and returns the span.
    pub(crate) fn str_body(
        &mut self,
        marker: Marker,
    ) -> Result<Option<Range<usize>>, MsgpackError> {
        let len = match marker {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => self.be(1)? as usize,
            Marker::Str16 => self.be(2)? as usize,
            Marker::Str32 => self.be(4)? as usize,
            _ => return Ok(None),
        };
        self.take(len).map(Some)
    }

    /// If `marker` starts an integer, reads it. `Some(None)` is a negative int.
    pub(crate) fn uint_body(
        &mut self,
        marker: Marker,
    ) -> Result<Option<Option<u64>>, MsgpackError> {
        let signed = |v: u64, bits: u32| {
            let shift = 64 - bits;
            let v = ((v << shift) as i64) >> shift;
            u64::try_from(v).ok()
        };
        Ok(Some(match marker {
            Marker::FixPos(n) => Some(u64::from(n)),
            Marker::U8 => Some(self.be(1)?),
            Marker::U16 => Some(self.be(2)?),
            Marker::U32 => Some(self.be(4)?),
            Marker::U64 => Some(self.be(8)?),
            Marker::FixNeg(_) => None,
            Marker::I8 => signed(self.be(1)?, 8),
            Marker::I16 => signed(self.be(2)?, 16),
            Marker::I32 => signed(self.be(4)?, 32),
            Marker::I64 => signed(self.be(8)?, 64),
            _ => return Ok(None),
        }))
    }

    /// If `marker` starts a map, reads its entry count.
    pub(crate) fn map_len(&mut self, marker: Marker) -> Result<Option<usize>, MsgpackError> {
        Ok(Some(match marker {
            Marker::FixMap(n) => usize::from(n),
            Marker::Map16 => self.be(2)? as usize,
            Marker::Map32 => self.be(4)? as usize,
            _ => return Ok(None),
        }))
    }

    /// Skips the body of a value whose marker was just read.
    pub(crate) fn skip_body(&mut self, marker: Marker) -> Result<(), MsgpackError> {
        // Values still to skip. Each needs at least one byte, so a count larger
        // than what is left is a truncated frame: that bound keeps the loop
        // linear in the frame size whatever lengths the headers claim.
        let mut pending: u64 = 0;
        let mut marker = marker;
        loop {
            let children: u64 = match marker {
                Marker::Null
                | Marker::True
                | Marker::False
                | Marker::FixPos(_)
                | Marker::FixNeg(_) => 0,
                Marker::U8 | Marker::I8 => self.take(1).map(|_| 0)?,
                Marker::U16 | Marker::I16 => self.take(2).map(|_| 0)?,
                Marker::U32 | Marker::I32 | Marker::F32 => self.take(4).map(|_| 0)?,
                Marker::U64 | Marker::I64 | Marker::F64 => self.take(8).map(|_| 0)?,
                Marker::FixStr(n) => self.take(usize::from(n)).map(|_| 0)?,
                Marker::Str8 | Marker::Bin8 => self.sized(1, 0)?,
                Marker::Str16 | Marker::Bin16 => self.sized(2, 0)?,
                Marker::Str32 | Marker::Bin32 => self.sized(4, 0)?,
                Marker::FixExt1 => self.take(2).map(|_| 0)?,
                Marker::FixExt2 => self.take(3).map(|_| 0)?,
                Marker::FixExt4 => self.take(5).map(|_| 0)?,
                Marker::FixExt8 => self.take(9).map(|_| 0)?,
                Marker::FixExt16 => self.take(17).map(|_| 0)?,
                Marker::Ext8 => self.sized(1, 1)?,
                Marker::Ext16 => self.sized(2, 1)?,
                Marker::Ext32 => self.sized(4, 1)?,
                Marker::FixArray(n) => u64::from(n),
                Marker::Array16 => self.be(2)?,
                Marker::Array32 => self.be(4)?,
                Marker::FixMap(n) => 2 * u64::from(n),
                Marker::Map16 => 2 * self.be(2)?,
                Marker::Map32 => 2 * self.be(4)?,
                Marker::Reserved => {
                    return Err(MsgpackError::Reserved {
                        offset: self.pos.saturating_sub(1),
                    });
                }
            };
            pending += children;
            if pending > self.remaining() as u64 {
                return Err(MsgpackError::Truncated { offset: self.pos });
            }
            if pending == 0 {
                return Ok(());
            }
            pending -= 1;
            marker = self.marker()?;
        }
    }

    /// Skips a length-prefixed body (str, bin, ext): `len_bytes` of length,
    /// then `extra` bytes (the ext type), then the body.
    fn sized(&mut self, len_bytes: usize, extra: usize) -> Result<u64, MsgpackError> {
        let len = self.be(len_bytes)? as usize;
        self.take(extra.saturating_add(len))?;
        Ok(0)
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

pub(crate) fn map_header_len(entries: usize) -> usize {
    match entries {
        0..=15 => 1,
        16..=0xffff => 3,
        _ => 5,
    }
}

pub(crate) fn put_map_header(dst: &mut impl BufMut, entries: usize) {
    match entries {
        0..=15 => dst.put_u8(0x80 | entries as u8),
        16..=0xffff => {
            dst.put_u8(0xde);
            dst.put_u16(entries as u16);
        }
        _ => {
            dst.put_u8(0xdf);
            dst.put_u32(entries as u32);
        }
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

/// Writes a str. Strings longer than `u32::MAX` cannot occur here: frames are
/// capped far below that and the encoder checks the total first.
pub(crate) fn put_str(dst: &mut impl BufMut, s: &str) {
    let n = s.len();
    match n {
        0..=31 => dst.put_u8(0xa0 | n as u8),
        32..=0xff => {
            dst.put_u8(0xd9);
            dst.put_u8(n as u8);
        }
        0x100..=0xffff => {
            dst.put_u8(0xda);
            dst.put_u16(n as u16);
        }
        _ => {
            dst.put_u8(0xdb);
            dst.put_u32(n as u32);
        }
    }
    dst.put_slice(s.as_bytes());
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

/// Writes an unsigned int in its shortest form (as every msgpack library does).
pub(crate) fn put_uint(dst: &mut impl BufMut, v: u64) {
    match v {
        0..=0x7f => dst.put_u8(v as u8),
        0x80..=0xff => {
            dst.put_u8(0xcc);
            dst.put_u8(v as u8);
        }
        0x100..=0xffff => {
            dst.put_u8(0xcd);
            dst.put_u16(v as u16);
        }
        0x1_0000..=0xffff_ffff => {
            dst.put_u8(0xce);
            dst.put_u32(v as u32);
        }
        _ => {
            dst.put_u8(0xcf);
            dst.put_u64(v);
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
            let mut ours = Vec::new();
            put_uint(&mut ours, v);
            let mut theirs = Vec::new();
            rmp::encode::write_uint(&mut theirs, v).expect("vec write");
            assert_eq!(ours, theirs, "uint {v}");
            assert_eq!(ours.len(), uint_len(v));
        }
        for n in [0usize, 31, 32, 255, 256, 65535, 65536] {
            let s = "x".repeat(n);
            let mut ours = Vec::new();
            put_str(&mut ours, &s);
            let mut theirs = Vec::new();
            rmp::encode::write_str(&mut theirs, &s).expect("vec write");
            assert_eq!(ours, theirs, "str of {n}");
            assert_eq!(ours.len(), str_len(&s));
        }
        for n in [0usize, 15, 16, 65535, 65536] {
            let mut ours = Vec::new();
            put_map_header(&mut ours, n);
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
        assert_eq!(
            check_single_value(&[0xc0, 0xc0]),
            Err(SingleValueError::Trailing(1))
        );
    }

    #[test]
    fn uint_accepts_non_negative_signed_forms() {
        let mut r = Reader::new(&[0xd0, 0x05]);
        let m = r.marker().expect("marker");
        assert_eq!(r.uint_body(m), Ok(Some(Some(5))));
        let mut r = Reader::new(&[0xd0, 0xfb]);
        let m = r.marker().expect("marker");
        assert_eq!(r.uint_body(m), Ok(Some(None)));
        let mut r = Reader::new(&[0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]);
        let m = r.marker().expect("marker");
        assert_eq!(r.uint_body(m), Ok(Some(None)));
    }
}
