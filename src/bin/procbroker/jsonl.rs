//! The JSON-lines form of envelopes: what `procbroker decode` prints and
//! `procbroker encode` reads back, so that `decode | encode` gives back the
//! payload's bytes exactly, whatever MessagePack it holds.
//!
//! A payload is shown as plain JSON where JSON can say it, and as a tagged
//! object (one key starting with `$`) where it cannot: bin, ext, timestamps,
//! f32, non-finite floats, str bytes that are not UTF-8, and maps a JSON
//! object cannot hold. Where even that form would not encode back to the same
//! bytes (an int or a length written longer than needed, NaN bits, nesting
//! deeper than JSON tools parse), the line also carries `payload_msgpack`,
//! the exact bytes in hex, and `encode` writes those: a payload is carried
//! byte for byte, as the broker carries it.

use anyhow::{Context, Result, bail};
use procbroker::protocol::{Envelope, MAX_KEY_BYTES, MessageType, Payload, RequestKey};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;
use std::time::{Duration, UNIX_EPOCH};

/// Nesting a shown payload may take. serde_json (and so `encode`) refuses
/// lines nested deeper than 128; a deeper payload is shown only as
/// `payload_msgpack`, which any depth fits in.
pub const MAX_DEPTH: usize = 100;

/// Last second of year 9999: the range RFC 3339 (and `humantime`) can write.
const LAST_RFC3339_SECOND: u64 = 253_402_300_799;

/// A JSON value whose objects keep their keys in the order they came in,
/// duplicates included: a map's order is part of its bytes, and
/// `serde_json::Map` sorts keys.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(Number),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn tag(name: &str, value: Json) -> Self {
        Self::Obj(vec![(name.to_owned(), value)])
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Null => s.serialize_unit(),
            Self::Bool(b) => s.serialize_bool(*b),
            Self::Num(n) => n.serialize(s),
            Self::Str(text) => s.serialize_str(text),
            Self::Arr(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Self::Obj(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    map.serialize_entry(key, value)?;
                }
                map.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Json, E> {
                Number::from_f64(n)
                    .map(Json::Num)
                    .ok_or_else(|| E::custom("a number JSON cannot hold"))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::Str(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Json::Arr(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Json>()? {
                    entries.push(entry);
                }
                Ok(Json::Obj(entries))
            }
        }
        d.deserialize_any(V)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => bail!("{:?} is not a hex digit", char::from(c)),
    };
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        bail!("hex of odd length {}", text.len());
    }
    text.chunks_exact(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

// ---- MessagePack to the readable form --------------------------------------

/// Why a payload has no readable form: too deep, or (never for a frame the
/// broker accepted) not MessagePack.
struct Unreadable;

/// A cursor over one payload.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Unreadable> {
        let end = self.pos.checked_add(n).ok_or(Unreadable)?;
        let bytes = self.buf.get(self.pos..end).ok_or(Unreadable)?;
        self.pos = end;
        Ok(bytes)
    }

    fn be(&mut self, n: usize) -> Result<u64, Unreadable> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
    }

    fn len(&mut self, n: usize) -> Result<usize, Unreadable> {
        usize::try_from(self.be(n)?).map_err(|_| Unreadable)
    }

    /// Values a container claims, capped by the bytes left (each value takes
    /// one at least), so a lying count allocates nothing.
    fn count(&mut self, n: usize) -> Result<usize, Unreadable> {
        let count = self.len(n)?;
        if count > self.buf.len() - self.pos {
            return Err(Unreadable);
        }
        Ok(count)
    }
}

/// The readable form of a payload (one MessagePack value), or `None` when it
/// nests deeper than [`MAX_DEPTH`].
pub fn readable(bytes: &[u8]) -> Option<Json> {
    let mut cursor = Cursor { buf: bytes, pos: 0 };
    let (json, height) = value(&mut cursor, 0).ok()?;
    (cursor.pos == bytes.len() && height <= MAX_DEPTH).then_some(json)
}

/// One value and the JSON nesting its form takes (0 for a scalar). `depth`
/// counts the MessagePack containers around it; each adds a level of JSON at
/// least, so recursion stops at [`MAX_DEPTH`].
fn value(c: &mut Cursor<'_>, depth: usize) -> Result<(Json, usize), Unreadable> {
    if depth > MAX_DEPTH {
        return Err(Unreadable);
    }
    let marker = c.take(1)?[0];
    let scalar = |json| Ok((json, 0));
    let tagged = |name: &str, json| Ok((Json::tag(name, json), 1));
    match marker {
        0x00..=0x7f => scalar(Json::Num(u64::from(marker).into())),
        0xe0..=0xff => scalar(Json::Num(i64::from(marker as i8).into())),
        0xcc => scalar(Json::Num(c.be(1)?.into())),
        0xcd => scalar(Json::Num(c.be(2)?.into())),
        0xce => scalar(Json::Num(c.be(4)?.into())),
        0xcf => scalar(Json::Num(c.be(8)?.into())),
        0xd0 => scalar(int(i64::from(c.be(1)? as u8 as i8))),
        0xd1 => scalar(int(i64::from(c.be(2)? as u16 as i16))),
        0xd2 => scalar(int(i64::from(c.be(4)? as u32 as i32))),
        0xd3 => scalar(int(c.be(8)? as i64)),
        0xc0 => scalar(Json::Null),
        0xc2 => scalar(Json::Bool(false)),
        0xc3 => scalar(Json::Bool(true)),
        0xca => {
            let f = f32::from_bits(c.be(4)? as u32);
            // The shortest decimal that reads back as this f32.
            match f.to_string().parse::<f64>().ok().and_then(Number::from_f64) {
                Some(n) => tagged("$f32", Json::Num(n)),
                None => tagged("$f32", Json::Str(non_finite(f64::from(f)).into())),
            }
        }
        0xcb => {
            let f = f64::from_bits(c.be(8)?);
            match Number::from_f64(f) {
                Some(n) => scalar(Json::Num(n)),
                None => tagged("$f64", Json::Str(non_finite(f).into())),
            }
        }
        0xa0..=0xbf => str(c, usize::from(marker & 0x1f)),
        0xd9 => {
            let n = c.len(1)?;
            str(c, n)
        }
        0xda => {
            let n = c.len(2)?;
            str(c, n)
        }
        0xdb => {
            let n = c.len(4)?;
            str(c, n)
        }
        0xc4..=0xc6 => {
            let n = c.len(1 << (marker - 0xc4))?;
            tagged("$bin", Json::Str(hex(c.take(n)?)))
        }
        0xd4..=0xd8 => ext(c, 1 << (marker - 0xd4)),
        0xc7..=0xc9 => {
            let n = c.len(1 << (marker - 0xc7))?;
            ext(c, n)
        }
        0x90..=0x9f => array(c, usize::from(marker & 0x0f), depth),
        0xdc => {
            let n = c.count(2)?;
            array(c, n, depth)
        }
        0xdd => {
            let n = c.count(4)?;
            array(c, n, depth)
        }
        0x80..=0x8f => map(c, usize::from(marker & 0x0f), depth),
        0xde => {
            let n = c.count(2)?;
            map(c, n, depth)
        }
        0xdf => {
            let n = c.count(4)?;
            map(c, n, depth)
        }
        0xc1 => Err(Unreadable),
    }
}

fn int(v: i64) -> Json {
    match u64::try_from(v) {
        Ok(u) => Json::Num(u.into()),
        Err(_) => Json::Num(v.into()),
    }
}

fn non_finite(f: f64) -> &'static str {
    if f.is_nan() {
        "NaN"
    } else if f > 0.0 {
        "inf"
    } else {
        "-inf"
    }
}

fn str(c: &mut Cursor<'_>, n: usize) -> Result<(Json, usize), Unreadable> {
    let bytes = c.take(n)?;
    Ok(match std::str::from_utf8(bytes) {
        Ok(text) => (Json::Str(text.to_owned()), 0),
        Err(_) => (Json::tag("$str", Json::Str(hex(bytes))), 1),
    })
}

fn ext(c: &mut Cursor<'_>, n: usize) -> Result<(Json, usize), Unreadable> {
    let kind = c.take(1)?[0] as i8;
    let data = c.take(n)?;
    if kind == -1
        && let Some(time) = timestamp(data)
    {
        let text = humantime::format_rfc3339(UNIX_EPOCH + time).to_string();
        return Ok((Json::tag("$timestamp", Json::Str(text)), 1));
    }
    let pair = Json::Arr(vec![
        Json::Num(i64::from(kind).into()),
        Json::Str(hex(data)),
    ]);
    Ok((Json::tag("$ext", pair), 2))
}

/// The time of a MessagePack timestamp (ext -1) that RFC 3339 can write.
fn timestamp(data: &[u8]) -> Option<Duration> {
    let be = |bytes: &[u8]| bytes.iter().fold(0u64, |acc, &b| acc << 8 | u64::from(b));
    let (secs, nanos) = match data.len() {
        4 => (be(data), 0),
        8 => {
            let v = be(data);
            (v & 0x3_ffff_ffff, v >> 34)
        }
        12 => (u64::try_from(be(&data[4..]) as i64).ok()?, be(&data[..4])),
        _ => return None,
    };
    (nanos < 1_000_000_000 && secs <= LAST_RFC3339_SECOND)
        .then(|| Duration::new(secs, nanos as u32))
}

fn array(c: &mut Cursor<'_>, n: usize, depth: usize) -> Result<(Json, usize), Unreadable> {
    let mut items = Vec::with_capacity(n);
    let mut height = 0;
    for _ in 0..n {
        let (item, h) = value(c, depth + 1)?;
        height = height.max(h);
        items.push(item);
    }
    Ok((Json::Arr(items), height + 1))
}

/// A JSON object where one can hold the map: string keys, none repeated,
/// and not one lone key starting with `$` (that is how a tag looks).
/// Otherwise `{"$map": [[key, value], …]}`.
fn map(c: &mut Cursor<'_>, n: usize, depth: usize) -> Result<(Json, usize), Unreadable> {
    let mut pairs = Vec::with_capacity(n);
    let mut height = 0;
    for _ in 0..n {
        let (key, hk) = value(c, depth + 1)?;
        let (val, hv) = value(c, depth + 1)?;
        height = height.max(hk).max(hv);
        pairs.push((key, val));
    }
    let mut seen = std::collections::HashSet::with_capacity(n);
    let as_object = pairs
        .iter()
        .all(|(k, _)| matches!(k, Json::Str(s) if seen.insert(s.as_str())))
        && !(n == 1 && matches!(&pairs[0].0, Json::Str(s) if s.starts_with('$')));
    if as_object {
        let entries = pairs
            .into_iter()
            .map(|(k, v)| match k {
                Json::Str(k) => (k, v),
                // Ruled out by `as_object`.
                _ => (String::new(), v),
            })
            .collect();
        return Ok((Json::Obj(entries), height + 1));
    }
    let pairs = pairs
        .into_iter()
        .map(|(k, v)| Json::Arr(vec![k, v]))
        .collect();
    Ok((Json::tag("$map", Json::Arr(pairs)), height + 3))
}

// ---- the readable form to MessagePack --------------------------------------

/// The MessagePack of a readable form, each value in its shortest encoding
/// (as every MessagePack library writes it).
pub fn to_msgpack(json: &Json) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    write(json, &mut out)?;
    Ok(out)
}

fn write(json: &Json, out: &mut Vec<u8>) -> Result<()> {
    match json {
        Json::Null => out.push(0xc0),
        Json::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Json::Num(n) => {
            if let Some(u) = n.as_u64() {
                uint(u, out);
            } else if let Some(i) = n.as_i64() {
                sint(i, out);
            } else if let Some(f) = n.as_f64() {
                out.push(0xcb);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
        }
        Json::Str(s) => str_bytes(s.as_bytes(), out)?,
        Json::Arr(items) => {
            header(items.len(), [0x90, 0xdc, 0xdd], out)?;
            for item in items {
                write(item, out)?;
            }
        }
        Json::Obj(entries) => match entries.as_slice() {
            [(key, value)] if key.starts_with('$') => {
                write_tag(key, value, out).with_context(|| format!("in {key:?}"))?;
            }
            _ => {
                header(entries.len(), [0x80, 0xde, 0xdf], out)?;
                for (key, value) in entries {
                    str_bytes(key.as_bytes(), out)?;
                    write(value, out)?;
                }
            }
        },
    }
    Ok(())
}

fn write_tag(tag: &str, value: &Json, out: &mut Vec<u8>) -> Result<()> {
    let text = |v: &Json| match v {
        Json::Str(s) => Ok(s.clone()),
        _ => bail!("expected a string"),
    };
    match tag {
        "$bin" => {
            let bytes = unhex(&text(value)?)?;
            sized(bytes.len(), [0xc4, 0xc5, 0xc6], out)?;
            out.extend_from_slice(&bytes);
        }
        "$str" => str_bytes(&unhex(&text(value)?)?, out)?,
        "$ext" => {
            let Json::Arr(pair) = value else {
                bail!("expected [type, \"hex\"]")
            };
            let [Json::Num(kind), data] = pair.as_slice() else {
                bail!("expected [type, \"hex\"]")
            };
            let kind = kind
                .as_i64()
                .and_then(|k| i8::try_from(k).ok())
                .context("an ext type is an integer from -128 to 127")?;
            ext_bytes(kind, &unhex(&text(data)?)?, out)?;
        }
        "$timestamp" => {
            let text = text(value)?;
            let time = humantime::parse_rfc3339(&text)
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .with_context(|| format!("{text:?} is not an RFC 3339 time in UTC"))?;
            let (secs, nanos) = (time.as_secs(), time.subsec_nanos());
            // The smallest of the three layouts that holds it.
            if secs >> 34 == 0 {
                if nanos == 0 && u32::try_from(secs).is_ok() {
                    ext_bytes(-1, &(secs as u32).to_be_bytes(), out)?;
                } else {
                    let packed = u64::from(nanos) << 34 | secs;
                    ext_bytes(-1, &packed.to_be_bytes(), out)?;
                }
            } else {
                let mut data = nanos.to_be_bytes().to_vec();
                data.extend_from_slice(&secs.to_be_bytes());
                ext_bytes(-1, &data, out)?;
            }
        }
        "$f32" => {
            let f = match value {
                // Read from the shortest decimal of the f64, which is the
                // decimal written: one rounding, straight to f32.
                Json::Num(n) => n
                    .as_f64()
                    .and_then(|f| f.to_string().parse::<f32>().ok())
                    .filter(|f| f.is_finite())
                    .context("not a number an f32 holds")?,
                other => non_finite_value(&text(other)?)? as f32,
            };
            out.push(0xca);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        "$f64" => {
            let f = match value {
                Json::Num(n) => n.as_f64().context("not a number")?,
                other => non_finite_value(&text(other)?)?,
            };
            out.push(0xcb);
            out.extend_from_slice(&f.to_bits().to_be_bytes());
        }
        "$map" => {
            let Json::Arr(pairs) = value else {
                bail!("expected [[key, value], …]")
            };
            header(pairs.len(), [0x80, 0xde, 0xdf], out)?;
            for pair in pairs {
                let Json::Arr(kv) = pair else {
                    bail!("expected [key, value], not {}", short(pair))
                };
                let [key, value] = kv.as_slice() else {
                    bail!("expected [key, value], not {}", short(pair))
                };
                write(key, out)?;
                write(value, out)?;
            }
        }
        _ => bail!(
            "unknown tag (an object of one key starting with '$' is a tag; \
             write such a map as {{\"$map\": [[key, value]]}})"
        ),
    }
    Ok(())
}

fn non_finite_value(text: &str) -> Result<f64> {
    Ok(match text {
        "NaN" => f64::NAN,
        "inf" => f64::INFINITY,
        "-inf" => f64::NEG_INFINITY,
        _ => bail!("expected a number, \"NaN\", \"inf\" or \"-inf\", not {text:?}"),
    })
}

/// A value's JSON, cut for an error message.
fn short(json: &Json) -> String {
    let mut text = serde_json::to_string(json).unwrap_or_default();
    if text.len() > 60 {
        let cut = (0..=60)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

fn uint(v: u64, out: &mut Vec<u8>) {
    match v {
        0..=0x7f => out.push(v as u8),
        0x80..=0xff => out.extend_from_slice(&[0xcc, v as u8]),
        0x100..=0xffff => {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
}

/// A negative int in its shortest form (non-negative ones go to [`uint`]).
fn sint(v: i64, out: &mut Vec<u8>) {
    if v >= 0 {
        return uint(v as u64, out);
    }
    if v >= -32 {
        out.push(v as i8 as u8);
    } else if let Ok(v) = i8::try_from(v) {
        out.extend_from_slice(&[0xd0, v as u8]);
    } else if let Ok(v) = i16::try_from(v) {
        out.push(0xd1);
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = i32::try_from(v) {
        out.push(0xd2);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// A length after an 8-, 16- or 32-bit marker.
fn sized(n: usize, [m8, m16, m32]: [u8; 3], out: &mut Vec<u8>) -> Result<()> {
    if let Ok(n) = u8::try_from(n) {
        out.extend_from_slice(&[m8, n]);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(m16);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        let n = u32::try_from(n).context("longer than MessagePack allows")?;
        out.push(m32);
        out.extend_from_slice(&n.to_be_bytes());
    }
    Ok(())
}

/// An array's or map's header: the fix marker up to 15, then 16 or 32 bits.
fn header(n: usize, [fix, m16, m32]: [u8; 3], out: &mut Vec<u8>) -> Result<()> {
    if n <= 15 {
        out.push(fix | n as u8);
    } else if let Ok(n) = u16::try_from(n) {
        out.push(m16);
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        let n = u32::try_from(n).context("longer than MessagePack allows")?;
        out.push(m32);
        out.extend_from_slice(&n.to_be_bytes());
    }
    Ok(())
}

fn str_bytes(bytes: &[u8], out: &mut Vec<u8>) -> Result<()> {
    if bytes.len() <= 31 {
        out.push(0xa0 | bytes.len() as u8);
    } else {
        sized(bytes.len(), [0xd9, 0xda, 0xdb], out)?;
    }
    out.extend_from_slice(bytes);
    Ok(())
}

fn ext_bytes(kind: i8, data: &[u8], out: &mut Vec<u8>) -> Result<()> {
    match data.len() {
        1 => out.push(0xd4),
        2 => out.push(0xd5),
        4 => out.push(0xd6),
        8 => out.push(0xd7),
        16 => out.push(0xd8),
        n => sized(n, [0xc7, 0xc8, 0xc9], out)?,
    }
    out.push(kind as u8);
    out.extend_from_slice(data);
    Ok(())
}

// ---- envelopes ---------------------------------------------------------------

/// The keys of a line, in the order `decode` prints them.
const KEYS: [&str; 14] = [
    "type",
    "id",
    "correlation_id",
    "source",
    "target",
    "timeout_ms",
    "stream",
    "more",
    "key",
    "key_msgpack",
    "error",
    "code",
    "payload",
    "payload_msgpack",
];

/// The line `decode` prints for an envelope.
pub fn envelope_line(e: &Envelope) -> Json {
    let text = |s: &str| Json::Str(s.to_owned());
    let mut obj = vec![
        ("type".to_owned(), text(e.kind.as_str())),
        ("id".to_owned(), text(&e.id)),
    ];
    if e.kind != MessageType::Event || e.correlation_id != 0 {
        obj.push(("correlation_id".into(), Json::Num(e.correlation_id.into())));
    }
    for (key, value) in [("source", &e.source), ("target", &e.target)] {
        if !value.is_empty() {
            obj.push((key.into(), text(value)));
        }
    }
    if let Some(ms) = e.timeout_ms {
        obj.push(("timeout_ms".into(), Json::Num(ms.into())));
    }
    for (key, set) in [("stream", e.stream), ("more", e.more)] {
        if set {
            obj.push((key.into(), Json::Bool(true)));
        }
    }
    match &e.key {
        Some(RequestKey::Str(key)) => obj.push(("key".into(), text(key))),
        // Not a key routing can use: its bytes, as they came.
        Some(RequestKey::Invalid(raw)) => {
            obj.push(("key_msgpack".into(), Json::Str(hex(raw.as_bytes()))));
        }
        None => {}
    }
    for (key, value) in [("error", &e.error), ("code", &e.code)] {
        if let Some(value) = value {
            obj.push((key.into(), text(value)));
        }
    }
    if let Some(payload) = &e.payload {
        let bytes = payload.as_bytes().as_ref();
        let shown = readable(bytes);
        // Checked the way `encode` will read it: from the printed text.
        let exact = shown.as_ref().is_some_and(|json| {
            serde_json::to_string(json)
                .ok()
                .and_then(|text| serde_json::from_str::<Json>(&text).ok())
                .is_some_and(|back| to_msgpack(&back).is_ok_and(|b| b == bytes))
        });
        if let Some(json) = shown {
            obj.push(("payload".into(), json));
        }
        if !exact {
            obj.push(("payload_msgpack".into(), Json::Str(hex(bytes))));
        }
    }
    Json::Obj(obj)
}

/// The envelope of a line `encode` reads.
pub fn line_envelope(line: &[u8]) -> Result<Envelope> {
    let text = std::str::from_utf8(line).context("not UTF-8")?;
    let json: Json = serde_json::from_str(text).context("not JSON")?;
    let Json::Obj(entries) = json else {
        bail!("an envelope must be a JSON object");
    };
    let mut fields: [Option<Json>; KEYS.len()] = Default::default();
    for (key, value) in entries {
        let Some(i) = KEYS.iter().position(|k| *k == key) else {
            bail!("unknown key {key:?} (the keys are {})", KEYS.join(", "));
        };
        if fields[i].replace(value).is_some() {
            bail!("{key:?} given twice");
        }
    }
    let [
        kind,
        id,
        correlation_id,
        source,
        target,
        timeout_ms,
        stream,
        more,
        key,
        key_msgpack,
        error,
        code,
        payload,
        payload_msgpack,
    ] = fields;
    let text = |value: Option<Json>, key: &str| -> Result<Option<String>> {
        match value {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Str(s)) => Ok(Some(s)),
            Some(other) => bail!("{key:?} must be a string, not {}", short(&other)),
        }
    };
    let uint = |value: Option<Json>, key: &str| -> Result<Option<u64>> {
        match value {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Num(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(other) => bail!(
                "{key:?} must be a non-negative integer, not {}",
                short(&other)
            ),
        }
    };
    let kind: MessageType = text(kind, "type")?.context("missing \"type\"")?.parse()?;
    let mut envelope = Envelope::request(
        text(target, "target")?.unwrap_or_default(),
        text(id, "id")?.unwrap_or_default(),
        uint(correlation_id, "correlation_id")?.unwrap_or(0),
    );
    envelope.kind = kind;
    envelope.source = text(source, "source")?.unwrap_or_default().into();
    envelope.timeout_ms = uint(timeout_ms, "timeout_ms")?;
    let flag = |value: Option<Json>, key: &str| -> Result<bool> {
        match value {
            None | Some(Json::Null) => Ok(false),
            Some(Json::Bool(b)) => Ok(b),
            Some(other) => bail!("{key:?} must be true or false, not {}", short(&other)),
        }
    };
    envelope.stream = flag(stream, "stream")?;
    envelope.more = flag(more, "more")?;
    envelope.key = match (text(key, "key")?, text(key_msgpack, "key_msgpack")?) {
        (None, None) => None,
        (Some(_), Some(_)) => bail!("give \"key\" or \"key_msgpack\", not both"),
        // A key over the limit is written all the same (as a str): the
        // broker is the one to refuse it.
        (Some(key), None) => Some(RequestKey::new(key.clone()).unwrap_or_else(|_| {
            let mut raw = Vec::with_capacity(key.len() + 5);
            // `str_bytes` fails only past 4 GiB, which no line holds.
            let _ = str_bytes(key.as_bytes(), &mut raw);
            RequestKey::Invalid(Payload::from_msgpack(raw).unwrap_or_else(|_| Payload::nil()))
        })),
        (None, Some(hex)) => {
            let bytes = unhex(&hex).context("\"key_msgpack\"")?;
            let raw = Payload::from_msgpack(bytes).context("\"key_msgpack\"")?;
            // Read as the broker reads it: a str (not a bin) of UTF-8 within
            // the limit is a key; anything else stays as given.
            let is_str = matches!(raw.as_bytes().first(), Some(0xa0..=0xbf | 0xd9..=0xdb));
            Some(match raw.decode::<String>() {
                Ok(text) if is_str && text.len() <= MAX_KEY_BYTES => RequestKey::Str(text.into()),
                _ => RequestKey::Invalid(raw),
            })
        }
    };
    envelope.error = text(error, "error")?.map(Into::into);
    envelope.code = text(code, "code")?.map(Into::into);
    envelope.payload = match (payload, payload_msgpack) {
        (None, None) => None,
        (Some(shown), None) => Some(Payload::from_msgpack(
            to_msgpack(&shown).context("\"payload\"")?,
        )?),
        (shown, Some(exact)) => {
            let hex = text(Some(exact), "payload_msgpack")?.unwrap_or_default();
            let bytes = unhex(&hex).context("\"payload_msgpack\"")?;
            // Edited `payload` with the old bytes beside it: say so rather
            // than send the bytes and drop the edit.
            if let Some(shown) = shown {
                let given = to_msgpack(&shown).context("\"payload\"")?;
                let of_bytes = readable(&bytes).map(|json| to_msgpack(&json));
                if !matches!(of_bytes, Some(Ok(b)) if b == given) {
                    bail!(
                        "\"payload\" and \"payload_msgpack\" disagree: \
                         drop \"payload_msgpack\" to send an edited payload"
                    );
                }
            }
            Some(Payload::from_msgpack(bytes).context("\"payload_msgpack\"")?)
        }
    };
    envelope.validate()?;
    Ok(envelope)
}
