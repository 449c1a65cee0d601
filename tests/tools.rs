//! `procbroker decode` and `procbroker encode`, run as real processes:
//! every frame the broker accepts is printed, and `decode | encode` gives
//! back every payload byte for byte, whatever MessagePack it holds.

use bytes::BytesMut;
use procbroker::protocol::{Envelope, EnvelopeCodec, MessageType, Payload};
use proptest::prelude::*;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use tokio_util::codec::Encoder;

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_procbroker"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn procbroker");
    let mut stdin_pipe = child.stdin.take().expect("stdin");
    // Written from a thread: the child's stdout fills while we write.
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || stdin_pipe.write_all(&input));
    let out = child.wait_with_output().expect("wait");
    writer.join().expect("writer").expect("write stdin");
    out
}

/// One frame per payload, envelopes of every type in turn.
fn frames(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = BytesMut::new();
    for (i, raw) in payloads.iter().enumerate() {
        let payload = Payload::from_msgpack(raw.clone()).expect("one MessagePack value");
        let kind = MessageType::ALL[i % MessageType::ALL.len()];
        let mut envelope = Envelope::request("svc", "M", i as u64 + 1).with_source("client.0");
        envelope.kind = kind;
        if kind == MessageType::Error {
            envelope = envelope.error_reply("handler", "x");
        }
        EnvelopeCodec::default()
            .encode(&envelope.with_raw_payload(payload), &mut stream)
            .expect("encode");
    }
    stream.to_vec()
}

fn texts(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .expect("utf8")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone())
        .expect("utf8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// `decode`, then `encode` of what it printed: both succeed, and the frames
/// come back byte for byte. Returns the printed lines.
fn round_trip(stream: &[u8]) -> Vec<String> {
    let decoded = run(&["decode"], stream);
    assert!(
        decoded.status.success(),
        "decode: {}",
        String::from_utf8_lossy(&decoded.stderr)
    );
    let encoded = run(&["encode", "--strict"], &decoded.stdout);
    assert!(
        encoded.status.success(),
        "encode: {}",
        String::from_utf8_lossy(&encoded.stderr)
    );
    if encoded.stdout != stream {
        // Name the first frame that differs.
        let printed = String::from_utf8_lossy(&decoded.stdout);
        let mut at = 0;
        for line in printed.lines() {
            let back = run(&["encode"], line.as_bytes()).stdout;
            let len =
                4 + u32::from_be_bytes(stream[at..at + 4].try_into().expect("prefix")) as usize;
            assert_eq!(
                back,
                stream[at..at + len],
                "{}",
                line.chars().take(300).collect::<String>()
            );
            at += len;
        }
        panic!("the streams differ");
    }
    texts(&decoded)
}

fn pack(value: &rmpv::Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("vec write");
    out
}

fn str8(s: &str) -> Vec<u8> {
    [vec![0xa0 | s.len() as u8], s.as_bytes().to_vec()].concat()
}

/// Every MessagePack kind, the forms JSON has no word for, and encodings
/// longer than needed (which a re-encoding library would normalise).
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("nil", vec![0xc0]),
        ("false", vec![0xc2]),
        ("true", vec![0xc3]),
        ("positive fixint", vec![0x7f]),
        ("negative fixint", vec![0xe0]),
        ("u8", vec![0xcc, 0xff]),
        ("u16", vec![0xcd, 0xff, 0xfe]),
        ("u32", vec![0xce, 0xff, 0xff, 0xff, 0xfd]),
        (
            "u64",
            vec![0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        ("u64 holding 1", vec![0xcf, 0, 0, 0, 0, 0, 0, 0, 1]),
        ("i8", vec![0xd0, 0x80]),
        ("i16", vec![0xd1, 0x80, 0x00]),
        ("i32", vec![0xd2, 0x80, 0, 0, 0]),
        ("i64", vec![0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ("i8 holding 5", vec![0xd0, 0x05]),
        ("i16 holding -1", vec![0xd1, 0xff, 0xff]),
        ("f32", vec![0xca, 0x3f, 0xc0, 0x00, 0x00]),
        (
            "f32 0.1",
            [vec![0xca], 0.1f32.to_bits().to_be_bytes().to_vec()].concat(),
        ),
        (
            "f32 -0",
            [vec![0xca], (-0.0f32).to_bits().to_be_bytes().to_vec()].concat(),
        ),
        (
            "f32 inf",
            [vec![0xca], f32::INFINITY.to_bits().to_be_bytes().to_vec()].concat(),
        ),
        (
            "f32 NaN with payload bits",
            vec![0xca, 0x7f, 0xc0, 0x12, 0x34],
        ),
        (
            "f64",
            vec![0xcb, 0x40, 0x09, 0x21, 0xfb, 0x54, 0x44, 0x2d, 0x18],
        ),
        (
            "f64 2.0",
            [vec![0xcb], 2.0f64.to_bits().to_be_bytes().to_vec()].concat(),
        ),
        (
            "f64 -0",
            [vec![0xcb], (-0.0f64).to_bits().to_be_bytes().to_vec()].concat(),
        ),
        (
            "f64 1e300",
            [vec![0xcb], 1e300f64.to_bits().to_be_bytes().to_vec()].concat(),
        ),
        (
            "f64 NaN",
            [vec![0xcb], f64::NAN.to_bits().to_be_bytes().to_vec()].concat(),
        ),
        (
            "f64 -inf",
            [
                vec![0xcb],
                f64::NEG_INFINITY.to_bits().to_be_bytes().to_vec(),
            ]
            .concat(),
        ),
        ("empty fixstr", vec![0xa0]),
        ("empty str8", vec![0xd9, 0x00]),
        ("str8 of 3", vec![0xd9, 3, b'a', b'b', b'c']),
        ("str not UTF-8", vec![0xa2, 0xff, 0xfe]),
        ("str with controls", str8("a\"\\\n\u{0}é")),
        ("bin8", vec![0xc4, 0x03, 0x00, 0x0a, 0xff]),
        ("bin 00ff", vec![0xc4, 0x02, 0x00, 0xff]),
        ("bin16 of 2", vec![0xc5, 0x00, 0x02, 0x00, 0xff]),
        ("empty bin", vec![0xc4, 0x00]),
        ("fixext1", vec![0xd4, 0x01, 0xaa]),
        ("fixext16", [vec![0xd8, 0xff], vec![7; 16]].concat()),
        ("ext8 of 3", vec![0xc7, 0x03, 0x05, 1, 2, 3]),
        ("ext8 of 4", vec![0xc7, 0x04, 0x07, 1, 2, 3, 4]),
        (
            "ext8 timestamp96",
            [vec![0xc7, 12, 0xff], vec![1; 12]].concat(),
        ),
        ("timestamp32", vec![0xd6, 0xff, 0x66, 0x32, 0x1a, 0x80]),
        (
            "timestamp64",
            [
                vec![0xd7, 0xff],
                ((500_000_000u64 << 34) | 1_714_557_600)
                    .to_be_bytes()
                    .to_vec(),
            ]
            .concat(),
        ),
        (
            "timestamp64 without nanoseconds",
            [vec![0xd7, 0xff], 1_714_557_600u64.to_be_bytes().to_vec()].concat(),
        ),
        (
            "timestamp96 before 1970",
            [
                vec![0xc7, 12, 0xff],
                5u32.to_be_bytes().to_vec(),
                (-86_400i64).to_be_bytes().to_vec(),
            ]
            .concat(),
        ),
        (
            "timestamp96 past year 9999",
            [
                vec![0xc7, 12, 0xff],
                0u32.to_be_bytes().to_vec(),
                (1i64 << 40).to_be_bytes().to_vec(),
            ]
            .concat(),
        ),
        (
            "timestamp64 with nanoseconds over a second",
            [
                vec![0xd7, 0xff],
                ((1_000_000_000u64 << 34) | 7).to_be_bytes().to_vec(),
            ]
            .concat(),
        ),
        ("empty array", vec![0x90]),
        ("array16 of 3", vec![0xdc, 0, 3, 1, 2, 3]),
        ("empty map", vec![0x80]),
        (
            "map16 of 1",
            [vec![0xde, 0, 1], str8("a"), vec![0x01]].concat(),
        ),
        (
            "map with non-string keys",
            vec![0x82, 0x01, 0xc3, 0xc0, 0x92, 0x01, 0x02],
        ),
        (
            "map with a repeated key",
            [vec![0x82], str8("a"), vec![1], str8("a"), vec![2]].concat(),
        ),
        (
            "map keys out of order",
            [vec![0x82], str8("b"), vec![1], str8("a"), vec![2]].concat(),
        ),
        (
            "the map {\"$bin\": \"00ff\"}",
            [vec![0x81], str8("$bin"), str8("00ff")].concat(),
        ),
        (
            "a map of one key \"$x\"",
            [vec![0x81], str8("$x"), vec![0xc0]].concat(),
        ),
        (
            "a map of two keys starting with $",
            [vec![0x82], str8("$bin"), vec![1], str8("$ext"), vec![2]].concat(),
        ),
    ];
    cases.push((
        "str32 of 70 KB",
        pack(&rmpv::Value::from("é".repeat(35_000))),
    ));
    cases.push((
        "bin32 of 70 KB",
        pack(&rmpv::Value::Binary(vec![0u8; 70_000])),
    ));
    cases.push((
        "array16",
        pack(&rmpv::Value::Array(
            (0..1000).map(rmpv::Value::from).collect(),
        )),
    ));
    for (name, depth) in [
        ("99 nested arrays", 99),
        ("100 nested arrays", 100),
        ("101 nested arrays", 101),
        ("5000 nested arrays", 5000),
        ("100000 nested arrays", 100_000),
    ] {
        let mut deep = vec![0x91u8; depth];
        deep.push(0x01);
        cases.push((name, deep));
    }
    let mut maps = Vec::new();
    for _ in 0..300 {
        maps.extend([0x81, 0xa1, b'k']);
    }
    maps.push(0xc0);
    cases.push(("300 nested maps", maps));
    cases
}

#[test]
fn decode_then_encode_gives_every_payload_back_byte_for_byte() {
    let cases = corpus();
    let payloads: Vec<Vec<u8>> = cases.iter().map(|(_, raw)| raw.clone()).collect();
    let printed = round_trip(&frames(&payloads));
    assert_eq!(printed.len(), cases.len());
    // As printed: a map's keys in their order (serde_json's Value sorts them).
    let text_of = |name: &str| {
        let i = cases.iter().position(|(n, _)| *n == name).expect("case");
        printed[i].as_str()
    };
    let by_name = |name: &str| -> serde_json::Value {
        serde_json::from_str(text_of(name)).expect("a JSON line")
    };
    // Readable where JSON can say it, tagged where it cannot, and the exact
    // bytes beside it only where the readable form would not give them.
    for (name, payload) in [
        ("bin 00ff", r#"{"$bin":"00ff"}"#),
        (
            "the map {\"$bin\": \"00ff\"}",
            r#"{"$map":[["$bin","00ff"]]}"#,
        ),
        ("a map of one key \"$x\"", r#"{"$map":[["$x",null]]}"#),
        (
            "a map of two keys starting with $",
            r#"{"$bin":1,"$ext":2}"#,
        ),
        ("map keys out of order", r#"{"b":1,"a":2}"#),
        ("map with a repeated key", r#"{"$map":[["a",1],["a",2]]}"#),
        (
            "map with non-string keys",
            r#"{"$map":[[1,true],[null,[1,2]]]}"#,
        ),
        ("f32", r#"{"$f32":1.5}"#),
        ("f32 0.1", r#"{"$f32":0.1}"#),
        ("f32 inf", r#"{"$f32":"inf"}"#),
        ("f64 2.0", "2.0"),
        ("f64 -inf", r#"{"$f64":"-inf"}"#),
        ("f64 NaN", r#"{"$f64":"NaN"}"#),
        ("str not UTF-8", r#"{"$str":"fffe"}"#),
        ("fixext1", r#"{"$ext":[1,"aa"]}"#),
        ("ext8 of 3", r#"{"$ext":[5,"010203"]}"#),
        ("timestamp32", r#"{"$timestamp":"2024-05-01T10:33:36Z"}"#),
        (
            "timestamp64",
            r#"{"$timestamp":"2024-05-01T10:00:00.500000000Z"}"#,
        ),
        (
            "timestamp96 before 1970",
            r#"{"$ext":[-1,"00000005fffffffffffeae80"]}"#,
        ),
        ("u64", "18446744073709551615"),
        ("i64", "-9223372036854775808"),
    ] {
        let line = text_of(name);
        assert!(
            line.ends_with(&format!(r#","payload":{payload}}}"#)),
            "{name}: {line}"
        );
    }
    // The bin and the map that looks like it are told apart.
    assert_ne!(
        by_name("bin 00ff")["payload"],
        by_name("the map {\"$bin\": \"00ff\"}")["payload"]
    );
    for name in [
        "u64 holding 1",
        "i8 holding 5",
        "i16 holding -1",
        "f32 NaN with payload bits",
        "empty str8",
        "bin16 of 2",
        "ext8 of 4",
        "timestamp64 without nanoseconds",
        "array16 of 3",
        "map16 of 1",
    ] {
        let line = by_name(name);
        let i = cases.iter().position(|(n, _)| *n == name).expect("case");
        let hex: String = cases[i].1.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(line["payload_msgpack"], hex.as_str(), "{name}: {line}");
        assert!(line.get("payload").is_some(), "{name}: still shown: {line}");
    }
    // Too deep for JSON tools: the exact bytes alone.
    assert!(
        by_name("100 nested arrays")
            .get("payload_msgpack")
            .is_none()
    );
    for name in [
        "101 nested arrays",
        "5000 nested arrays",
        "100000 nested arrays",
    ] {
        let line = by_name(name);
        assert!(line.get("payload").is_none(), "{name}");
        assert!(line["payload_msgpack"].as_str().is_some(), "{name}");
    }
}

#[test]
fn decode_prints_a_payload_nested_100000_deep_and_the_frames_after_it() {
    let mut deep = vec![0x91u8; 100_000];
    deep.push(0x01);
    let mut stream = frames(&[deep.clone()]);
    let mut tick = BytesMut::new();
    EnvelopeCodec::default()
        .encode(&Envelope::event("*", "tick"), &mut tick)
        .expect("encode");
    stream.extend_from_slice(&tick);
    let out = run(&["decode"], &stream);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = lines(&out);
    assert_eq!(printed.len(), 2);
    let hex: String = deep.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(printed[0]["payload_msgpack"], hex.as_str());
    assert_eq!(printed[1]["id"], "tick");
    // And back, byte for byte.
    assert_eq!(round_trip(&stream), texts(&out));
}

#[test]
fn encode_reports_each_bad_line_by_number_and_goes_on_unless_strict() {
    let good = |id: &str| format!(r#"{{"type":"event","id":"{id}","target":"*"}}"#);
    let mut input = Vec::new();
    for line in [
        good("one"),
        "not json".into(),
        good("two"),
        r#"{"type":"request","id":"Echo"}"#.into(),
        r#"{"type":"event","id":"x","target":"*","payload":{"$nope":1}}"#.into(),
        // An edited payload beside the bytes it was decoded from.
        r#"{"type":"event","id":"x","target":"*","payload":2,"payload_msgpack":"01"}"#.into(),
        r#"{"type":"event","id":"x","target":"*","paylod":1}"#.into(),
    ] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
    }
    input.extend_from_slice(b"\xff\xfe\n");
    input.extend_from_slice(good("three").as_bytes());

    let out = run(&["encode"], &input);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (line, why) in [
        (2, "not JSON"),
        (4, "missing required field \"target\""),
        (5, "unknown tag"),
        (6, "\"payload\" and \"payload_msgpack\" disagree"),
        (7, "unknown key \"paylod\""),
        (8, "not UTF-8"),
    ] {
        let said = stderr
            .lines()
            .find(|l| l.starts_with(&format!("procbroker encode: line {line}: ")));
        assert!(
            said.is_some_and(|l| l.contains(why)),
            "line {line}: {stderr}"
        );
    }
    assert!(stderr.contains("6 of 9 lines were not written"), "{stderr}");
    let decoded = lines(&run(&["decode"], &out.stdout));
    let ids: Vec<&str> = decoded.iter().filter_map(|l| l["id"].as_str()).collect();
    assert_eq!(ids, ["one", "two", "three"]);

    let strict = run(&["encode", "--strict"], &input);
    assert_eq!(strict.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&strict.stderr);
    assert!(stderr.contains("line 2: not JSON"), "{stderr}");
    assert!(!stderr.contains("line 4"), "{stderr}");
    let ids: Vec<String> = lines(&run(&["decode"], &strict.stdout))
        .iter()
        .filter_map(|l| l["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids, ["one"]);
}

/// The v1.1 keys: `stream` and `more` print only when true, a key as its
/// text, a key routing cannot use as its bytes (`key_msgpack`); and they
/// come back through `encode`, a key over the limit included (so a bad
/// key can be sent by hand to see the broker refuse it).
#[test]
fn v1_1_keys_print_and_come_back() {
    let request = Envelope::request("svc", "Count", 1)
        .with_source("client.0")
        .with_stream()
        .with_key("session-1")
        .expect("key");
    let partial = request.partial_response(None).with_source("svc.0");
    let mut int_key = Envelope::request("svc", "M", 2);
    int_key.key = Some(procbroker::protocol::RequestKey::Invalid(
        Payload::encode(&7u8).expect("int"),
    ));
    let mut stream = BytesMut::new();
    for e in [&request, &partial, &int_key] {
        EnvelopeCodec::default()
            .encode(e, &mut stream)
            .expect("encode");
    }
    let printed = round_trip(&stream);
    assert!(
        printed[0].contains(r#""stream":true,"key":"session-1""#),
        "{}",
        printed[0]
    );
    assert!(printed[1].contains(r#""more":true"#), "{}", printed[1]);
    assert!(
        printed[2].contains(r#""key_msgpack":"07""#),
        "{}",
        printed[2]
    );
    for line in &printed {
        assert!(!line.contains("false"), "{line}");
    }

    let long = "k".repeat(257);
    let line = format!(
        r#"{{"type":"request","id":"M","correlation_id":3,"target":"svc","key":"{long}"}}"#
    );
    let out = run(&["encode", "--strict"], line.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let frame = Envelope::decode(&bytes::Bytes::copy_from_slice(&out.stdout[4..])).expect("valid");
    assert_eq!(
        frame.key.expect("key").problem(),
        Some(procbroker::protocol::KeyError::TooLong(257))
    );
    let both = r#"{"type":"request","id":"M","correlation_id":3,"target":"svc","key":"a","key_msgpack":"a161"}"#;
    assert!(
        !run(&["encode", "--strict"], both.as_bytes())
            .status
            .success()
    );
    let not_bool = r#"{"type":"request","id":"M","correlation_id":3,"target":"svc","stream":1}"#;
    let out = run(&["encode", "--strict"], not_bool.as_bytes());
    assert!(String::from_utf8_lossy(&out.stderr).contains("true or false"));
}

/// Any MessagePack value, in any of its encodings (not only the shortest).
fn any_msgpack() -> impl Strategy<Value = Vec<u8>> {
    fn sized(n: usize, width: u8, markers: [u8; 3]) -> Vec<u8> {
        let need = if n <= 0xff {
            0
        } else if n <= 0xffff {
            1
        } else {
            2
        };
        match width.max(need) {
            0 => vec![markers[0], n as u8],
            1 => [vec![markers[1]], (n as u16).to_be_bytes().to_vec()].concat(),
            _ => [vec![markers[2]], (n as u32).to_be_bytes().to_vec()].concat(),
        }
    }
    fn container(n: usize, width: u8, fix: u8, m16: u8, m32: u8) -> Vec<u8> {
        match width {
            0 if n <= 15 => vec![fix | n as u8],
            0 | 1 => [vec![m16], (n as u16).to_be_bytes().to_vec()].concat(),
            _ => [vec![m32], (n as u32).to_be_bytes().to_vec()].concat(),
        }
    }
    fn str_of(bytes: &[u8], width: u8) -> Vec<u8> {
        let head = if width == 0 && bytes.len() <= 31 {
            vec![0xa0 | bytes.len() as u8]
        } else {
            sized(bytes.len(), width.saturating_sub(1), [0xd9, 0xda, 0xdb])
        };
        [head, bytes.to_vec()].concat()
    }
    fn ext_of(kind: i8, data: &[u8], fixed: bool) -> Vec<u8> {
        let head = match (fixed, data.len()) {
            (true, 1) => vec![0xd4],
            (true, 2) => vec![0xd5],
            (true, 4) => vec![0xd6],
            (true, 8) => vec![0xd7],
            (true, 16) => vec![0xd8],
            (_, n) => sized(n, 0, [0xc7, 0xc8, 0xc9]),
        };
        [head, vec![kind as u8], data.to_vec()].concat()
    }
    let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n);
    let leaf = prop_oneof![
        Just(vec![0xc0]),
        any::<bool>().prop_map(|b| vec![if b { 0xc3 } else { 0xc2 }]),
        (any::<u64>(), 0..5u8).prop_map(|(v, w)| match w {
            0 if v < 128 => vec![v as u8],
            0 | 1 if v <= 0xff => vec![0xcc, v as u8],
            0..=2 if v <= 0xffff => [vec![0xcd], (v as u16).to_be_bytes().to_vec()].concat(),
            0..=3 if v <= 0xffff_ffff => [vec![0xce], (v as u32).to_be_bytes().to_vec()].concat(),
            _ => [vec![0xcf], v.to_be_bytes().to_vec()].concat(),
        }),
        (any::<i64>(), 0..5u8).prop_map(|(v, w)| match w {
            0 if (-32..0).contains(&v) => vec![v as u8],
            0 | 1 if i8::try_from(v).is_ok() => vec![0xd0, v as u8],
            0..=2 if i16::try_from(v).is_ok() =>
                [vec![0xd1], (v as i16).to_be_bytes().to_vec()].concat(),
            0..=3 if i32::try_from(v).is_ok() =>
                [vec![0xd2], (v as i32).to_be_bytes().to_vec()].concat(),
            _ => [vec![0xd3], v.to_be_bytes().to_vec()].concat(),
        }),
        any::<u32>().prop_map(|b| [vec![0xca], b.to_be_bytes().to_vec()].concat()),
        any::<f32>().prop_map(|f| [vec![0xca], f.to_bits().to_be_bytes().to_vec()].concat()),
        any::<u64>().prop_map(|b| [vec![0xcb], b.to_be_bytes().to_vec()].concat()),
        any::<f64>().prop_map(|f| [vec![0xcb], f.to_bits().to_be_bytes().to_vec()].concat()),
        ("\\PC{0,40}", 0..4u8).prop_map(|(s, w)| str_of(s.as_bytes(), w)),
        (bytes(40), 0..4u8).prop_map(|(b, w)| str_of(&b, w)),
        (bytes(40), 0..3u8).prop_map(|(b, w)| [sized(b.len(), w, [0xc4, 0xc5, 0xc6]), b].concat()),
        (any::<i8>(), bytes(20), any::<bool>()).prop_map(|(k, d, f)| ext_of(k, &d, f)),
        // Timestamps: any data of the three sizes, valid or not.
        (
            prop_oneof![Just(4usize), Just(8), Just(12)],
            any::<[u8; 12]>(),
            any::<bool>()
        )
            .prop_map(|(n, d, f)| ext_of(-1, &d[..n], f)),
        (any::<u32>(), 0u64..1 << 34, 0u32..1_000_000_000).prop_map(|(_, s, ns)| ext_of(
            -1,
            &((u64::from(ns) << 34) | s).to_be_bytes(),
            true
        )),
    ];
    leaf.prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            (proptest::collection::vec(inner.clone(), 0..8), 0..3u8).prop_map(|(items, w)| {
                [container(items.len(), w, 0x90, 0xdc, 0xdd), items.concat()].concat()
            }),
            (
                proptest::collection::vec((inner.clone(), inner.clone()), 0..6),
                0..3u8
            )
                .prop_map(|(pairs, w)| {
                    let body: Vec<u8> = pairs
                        .iter()
                        .flat_map(|(k, v)| [k.clone(), v.clone()].concat())
                        .collect();
                    [container(pairs.len(), w, 0x80, 0xde, 0xdf), body].concat()
                }),
            // String keys, some of them tag-like.
            proptest::collection::vec(("\\$?(bin|map|ext|[a-c]{0,2})", inner), 0..4).prop_map(
                |pairs| {
                    let body: Vec<u8> = pairs
                        .iter()
                        .flat_map(|(k, v)| [str_of(k.as_bytes(), 0), v.clone()].concat())
                        .collect();
                    [container(pairs.len(), 0, 0x80, 0xde, 0xdf), body].concat()
                }
            ),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn decode_then_encode_gives_any_payload_back(
        payloads in proptest::collection::vec(any_msgpack(), 1..12)
    ) {
        round_trip(&frames(&payloads));
    }
}
