//! The payloads the kit sends through `Echo`, written byte by byte: every
//! MessagePack format (ext and the three timestamp forms included), forms
//! longer than needed that a re-encoding would change, and 8 MiB. A
//! subject must give each back byte for byte.
//!
//! And one value for the paths where an SDK may decode and re-encode a
//! payload (calls out, events): integers beyond 2⁵³, bin, str, floats,
//! nesting; compared as values there, not as bytes.

use rmpv::Value;

/// A payload and what it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// What it is, for a failure's detail.
    pub name: &'static str,
    /// Its MessagePack bytes: one value.
    pub bytes: Vec<u8>,
}

fn sample(name: &'static str, bytes: Vec<u8>) -> Sample {
    Sample { name, bytes }
}

/// `head` followed by `len` bytes of a repeating pattern.
fn with_body(head: &[u8], len: usize) -> Vec<u8> {
    let mut out = head.to_vec();
    out.extend((0..len).map(|i| (i % 251) as u8));
    out
}

/// `head` followed by `len` ASCII letters (a str body).
fn with_text(head: &[u8], len: usize) -> Vec<u8> {
    let mut out = head.to_vec();
    out.extend((0..len).map(|i| b'a' + (i % 26) as u8));
    out
}

/// `head` followed by `n` copies of `item`.
fn repeated(head: &[u8], n: usize, item: &[u8]) -> Vec<u8> {
    let mut out = head.to_vec();
    for _ in 0..n {
        out.extend_from_slice(item);
    }
    out
}

/// A map of `n` entries `{"kNNNNN": true}` after `head`.
fn map_of(head: &[u8], n: usize) -> Vec<u8> {
    let mut out = head.to_vec();
    for i in 0..n {
        out.push(0xa6);
        out.extend_from_slice(format!("k{i:05}").as_bytes());
        out.push(0xc3);
    }
    out
}

/// Arrays and maps nested `depth` deep around an int.
fn nested(depth: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for level in 0..depth {
        if level % 2 == 0 {
            out.push(0x91); // [ ... ]
        } else {
            out.extend_from_slice(&[0x81, 0xa1, b'n']); // {"n": ...}
        }
    }
    out.push(0x2a);
    out
}

/// Every MessagePack format, each in its shortest form for its value.
pub fn types() -> Vec<Sample> {
    vec![
        sample("nil", vec![0xc0]),
        sample("false", vec![0xc2]),
        sample("true", vec![0xc3]),
        sample("positive fixint 0", vec![0x00]),
        sample("positive fixint 127", vec![0x7f]),
        sample("negative fixint -1", vec![0xff]),
        sample("negative fixint -32", vec![0xe0]),
        sample("uint 8", vec![0xcc, 0xff]),
        sample("uint 16", vec![0xcd, 0xff, 0xff]),
        sample("uint 32", vec![0xce, 0xff, 0xff, 0xff, 0xff]),
        sample("uint 64 max", with_fill(&[0xcf], 8, 0xff)),
        sample(
            "uint 64 2^53+1",
            [&[0xcf][..], &(9_007_199_254_740_993u64).to_be_bytes()].concat(),
        ),
        sample("int 8", vec![0xd0, 0x80]),
        sample("int 16", vec![0xd1, 0x80, 0x00]),
        sample("int 32", vec![0xd2, 0x80, 0x00, 0x00, 0x00]),
        sample(
            "int 64 min",
            [&[0xd3][..], &i64::MIN.to_be_bytes()].concat(),
        ),
        sample("float 32", [&[0xca][..], &1.5f32.to_be_bytes()].concat()),
        sample("float 64", [&[0xcb][..], &0.1f64.to_be_bytes()].concat()),
        sample(
            "float 64 -0.0",
            [&[0xcb][..], &(-0.0f64).to_be_bytes()].concat(),
        ),
        sample(
            "float 64 inf",
            [&[0xcb][..], &f64::INFINITY.to_be_bytes()].concat(),
        ),
        sample(
            "float 64 NaN with a payload",
            vec![0xcb, 0x7f, 0xf8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01],
        ),
        sample("fixstr empty", vec![0xa0]),
        sample("fixstr", [&[0xa5][..], b"hello"].concat()),
        sample(
            "fixstr UTF-8",
            [&[0xaa][..], "h\u{e9}llo \u{2713}".as_bytes()].concat(),
        ),
        sample("str 8", with_text(&[0xd9, 0x20], 32)),
        sample("str 16", with_text(&[0xda, 0x01, 0x00], 256)),
        sample("str 32", with_text(&[0xdb, 0x00, 0x01, 0x00, 0x00], 65_536)),
        sample("bin 8 empty", vec![0xc4, 0x00]),
        sample("bin 8", vec![0xc4, 0x04, 0x00, 0xff, 0x80, 0x0a]),
        sample("bin 16", with_body(&[0xc5, 0x01, 0x00], 256)),
        sample("bin 32", with_body(&[0xc6, 0x00, 0x01, 0x00, 0x00], 65_536)),
        sample("fixarray empty", vec![0x90]),
        sample("fixarray", vec![0x93, 0x01, 0xa1, b'x', 0xc0]),
        sample("array 16", repeated(&[0xdc, 0x00, 0x10], 16, &[0xc3])),
        sample(
            "array 32",
            repeated(&[0xdd, 0x00, 0x01, 0x00, 0x00], 65_536, &[0x07]),
        ),
        sample("fixmap empty", vec![0x80]),
        sample(
            "fixmap",
            vec![0x82, 0xa1, b'a', 0x01, 0xa1, b'b', 0x92, 0xc2, 0xc0],
        ),
        sample("map 16", map_of(&[0xde, 0x00, 0x10], 16)),
        sample("map 32", map_of(&[0xdf, 0x00, 0x01, 0x00, 0x00], 65_536)),
        sample(
            "map with keys that are not str",
            vec![
                0x83, 0x01, 0x02, 0xc0, 0xc3, 0x92, 0x01, 0x02, 0xc4, 0x01, 0x09,
            ],
        ),
        sample("fixext 1", vec![0xd4, 0x01, 0xab]),
        sample("fixext 2", vec![0xd5, 0x02, 0xab, 0xcd]),
        sample("fixext 4", with_body(&[0xd6, 0x05], 4)),
        sample("fixext 8", with_body(&[0xd7, 0x7f], 8)),
        sample("fixext 16 of type -128", with_body(&[0xd8, 0x80], 16)),
        sample("ext 8", with_body(&[0xc7, 0x03, 0x10], 3)),
        sample("ext 8 empty", vec![0xc7, 0x00, 0x11]),
        sample("ext 16", with_body(&[0xc8, 0x01, 0x00, 0x20], 256)),
        sample(
            "ext 32",
            with_body(&[0xc9, 0x00, 0x01, 0x00, 0x00, 0x30], 65_536),
        ),
        sample(
            "timestamp 32",
            [&[0xd6, 0xff][..], &1_700_000_000u32.to_be_bytes()].concat(),
        ),
        sample(
            "timestamp 64",
            [
                &[0xd7, 0xff][..],
                &((123_456_789u64 << 34) | 1_700_000_000u64).to_be_bytes(),
            ]
            .concat(),
        ),
        sample(
            "timestamp 96 before 1970",
            [
                &[0xc7, 0x0c, 0xff][..],
                &999_999_999u32.to_be_bytes(),
                &(-62_135_596_800i64).to_be_bytes(),
            ]
            .concat(),
        ),
        sample("nested 64 deep", nested(64)),
    ]
}

/// Forms longer than the value needs: a decoder would read them, an
/// encoder would not write them again. Carried verbatim, they stay.
pub fn non_canonical() -> Vec<Sample> {
    vec![
        sample("1 as uint 8", vec![0xcc, 0x01]),
        sample("1 as uint 16", vec![0xcd, 0x00, 0x01]),
        sample("1 as uint 32", vec![0xce, 0x00, 0x00, 0x00, 0x01]),
        sample("1 as uint 64", [&[0xcf][..], &1u64.to_be_bytes()].concat()),
        sample("1 as int 8", vec![0xd0, 0x01]),
        sample("-1 as int 16", vec![0xd1, 0xff, 0xff]),
        sample("5 as int 64", [&[0xd3][..], &5i64.to_be_bytes()].concat()),
        sample(
            "1.0 as float 64",
            [&[0xcb][..], &1.0f64.to_be_bytes()].concat(),
        ),
        sample("\"a\" as str 8", vec![0xd9, 0x01, b'a']),
        sample("\"ab\" as str 16", vec![0xda, 0x00, 0x02, b'a', b'b']),
        sample("\"\" as str 32", vec![0xdb, 0x00, 0x00, 0x00, 0x00]),
        sample("1 byte as bin 16", vec![0xc5, 0x00, 0x01, 0x07]),
        sample("no bytes as bin 32", vec![0xc6, 0x00, 0x00, 0x00, 0x00]),
        sample("[1] as array 16", vec![0xdc, 0x00, 0x01, 0x01]),
        sample("[] as array 32", vec![0xdd, 0x00, 0x00, 0x00, 0x00]),
        sample(
            "{\"k\": 1} as map 16",
            vec![0xde, 0x00, 0x01, 0xa1, b'k', 0x01],
        ),
        sample("{} as map 32", vec![0xdf, 0x00, 0x00, 0x00, 0x00]),
        sample("ext of 1 byte as ext 8", vec![0xc7, 0x01, 0x05, 0xaa]),
        sample(
            "ext of 4 bytes as ext 16",
            with_body(&[0xc8, 0x00, 0x04, 0x05], 4),
        ),
        sample(
            "empty ext as ext 32",
            vec![0xc9, 0x00, 0x00, 0x00, 0x00, 0x05],
        ),
        sample(
            "timestamp 32 in the 64 form",
            [&[0xd7, 0xff][..], &1_700_000_000u64.to_be_bytes()].concat(),
        ),
        sample(
            "timestamp 32 in the 96 form",
            [
                &[0xc7, 0x0c, 0xff][..],
                &0u32.to_be_bytes(),
                &1_700_000_000i64.to_be_bytes(),
            ]
            .concat(),
        ),
        sample(
            "a map with one key twice",
            vec![0x82, 0xa1, b'a', 0x01, 0xa1, b'a', 0x02],
        ),
    ]
}

/// `head` followed by `len` bytes of `fill`.
fn with_fill(head: &[u8], len: usize, fill: u8) -> Vec<u8> {
    let mut out = head.to_vec();
    out.resize(head.len() + len, fill);
    out
}

/// 8 MiB of bytes as one bin 32 (the payload is 8 MiB and 5 bytes).
pub fn eight_mib() -> Sample {
    let len: u32 = 8 << 20;
    let mut bytes = Vec::with_capacity(len as usize + 5);
    bytes.push(0xc6);
    bytes.extend_from_slice(&len.to_be_bytes());
    // A pattern that no short period repeats: an LCG's high bytes.
    let mut x: u32 = 0x9e37_79b9;
    bytes.extend((0..len).map(|_| {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (x >> 24) as u8
    }));
    sample("8 MiB of bin", bytes)
}

/// A value for the paths that may decode and re-encode (calls out,
/// events): what must survive there is the value, not its bytes.
pub fn decoded_value() -> Value {
    Value::Map(vec![
        ("u64 max".into(), Value::from(u64::MAX)),
        ("2^53+1".into(), Value::from(9_007_199_254_740_993u64)),
        ("i64 min".into(), Value::from(i64::MIN)),
        ("bin".into(), Value::Binary(vec![0, 1, 2, 0xff, 0x80])),
        ("str".into(), Value::from("h\u{e9}llo \u{2713}")),
        ("float".into(), Value::F64(1.5)),
        (
            "nested".into(),
            Value::Array(vec![
                Value::Nil,
                Value::Boolean(true),
                Value::Map(vec![("k".into(), Value::Array(vec![1.into(), 2.into()]))]),
            ]),
        ),
    ])
}

/// `value` as MessagePack bytes.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, value);
    out
}

/// The first `n` bytes of `bytes` in hex, `…` when there are more.
pub fn hex_prefix(bytes: &[u8], n: usize) -> String {
    let shown: Vec<String> = bytes.iter().take(n).map(|b| format!("{b:02x}")).collect();
    let more = if bytes.len() > n { " …" } else { "" };
    format!("{}{more}", shown.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Payload;

    /// One whole value, per the broker's own check.
    fn one_value(sample: &Sample) {
        Payload::from_msgpack(sample.bytes.clone())
            .unwrap_or_else(|e| panic!("{}: not one MessagePack value: {e}", sample.name));
    }

    #[test]
    fn every_sample_is_one_value() {
        for sample in types().iter().chain(&non_canonical()) {
            one_value(sample);
        }
        one_value(&eight_mib());
        assert_eq!(eight_mib().bytes.len(), (8 << 20) + 5);
    }

    #[test]
    fn the_types_are_shortest_forms_and_the_others_are_not() {
        // rmpv writes the shortest form of a value: the samples of every
        // type come back as they are (NaN, -0.0 and nested maps included).
        for sample in types() {
            let value = rmpv::decode::read_value(&mut &sample.bytes[..]).expect("decodes");
            let again = encode(&value);
            assert_eq!(
                again, sample.bytes,
                "{} is not in its shortest form",
                sample.name
            );
        }
        // Some are longer than needed only to an encoder that knows what
        // they mean (a timestamp, a float that is an integer); rmpv writes
        // them back as they are.
        let semantic = [
            "1.0 as float 64",
            "timestamp 32 in the 64 form",
            "timestamp 32 in the 96 form",
            "a map with one key twice",
        ];
        for sample in non_canonical() {
            if semantic.contains(&sample.name) {
                continue;
            }
            let value = rmpv::decode::read_value(&mut &sample.bytes[..]).expect("decodes");
            assert_ne!(encode(&value), sample.bytes, "{} is canonical", sample.name);
        }
    }

    #[test]
    fn the_sample_names_are_unique() {
        let mut names: Vec<&str> = types()
            .iter()
            .chain(&non_canonical())
            .map(|s| s.name)
            .collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all);
    }

    #[test]
    fn hex_prefix_shows_the_start() {
        assert_eq!(hex_prefix(&[0xc0], 4), "c0");
        assert_eq!(hex_prefix(&[1, 2, 3], 2), "01 02 …");
    }
}
