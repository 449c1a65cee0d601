//! Codec benchmarks, comparable with v2e's Go figures.
//!
//! - `codec/small_round_trip`: build a request with payload
//!   `{name: "test", value: 123}`, encode it as a frame, decode the frame,
//!   decode the payload into its struct (v2e's FullCycle).
//! - `codec/cve_round_trip`: the same with a ~20 KB NVD 2.0 CVE item.
//! - `codec/relay_small`, `codec/relay_cve`: the broker's work per hop:
//!   decode a frame body, stamp `source`, encode the frame (payload untouched).
//! - `codec/reference_rmp_serde_named`: the yardstick measured in the same run.
//!   The quoted figure "encode + decode of a small envelope ~130 ns as a map":
//!   this is that exact operation (rmp-serde, named, a six-field struct with a
//!   64 B `serde_bytes` payload). Absolute times on a shared VM drift several
//!   times over between days; divide by this to compare with the design.
//!
//! Run: `cargo bench --bench codec`.

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use procbroker::protocol::{Envelope, EnvelopeCodec, Payload};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Small {
    name: String,
    value: i64,
}

/// The ~20 KB CVE payload of the Go anchor (`NewLargeCVE(60, 40)` in
/// `benches/v2e-go/msgbench/cve.go`), field for field and value for value:
/// an NVD 2.0 `{"cve": item}` with its `metrics` as a map, 40 CPE matches and
/// 60 references.
mod cve {
    use serde::{Deserialize, Serialize};
    use std::collections::HashMap;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub struct Response {
        pub cve: Item,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct Item {
        pub id: String,
        pub source_identifier: String,
        pub published: String,
        pub last_modified: String,
        pub vuln_status: String,
        pub descriptions: Vec<LangString>,
        pub metrics: HashMap<String, Vec<CvssMetric>>,
        pub weaknesses: Vec<Weakness>,
        pub configurations: Vec<Configuration>,
        pub references: Vec<Reference>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub struct LangString {
        pub lang: String,
        pub value: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct CvssMetric {
        pub source: String,
        #[serde(rename = "type")]
        pub kind: String,
        pub cvss_data: CvssData,
        pub exploitability_score: f64,
        pub impact_score: f64,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct CvssData {
        pub version: String,
        pub vector_string: String,
        pub attack_vector: String,
        pub attack_complexity: String,
        pub privileges_required: String,
        pub user_interaction: String,
        pub scope: String,
        pub confidentiality_impact: String,
        pub integrity_impact: String,
        pub availability_impact: String,
        pub base_score: f64,
        pub base_severity: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub struct Weakness {
        pub source: String,
        #[serde(rename = "type")]
        pub kind: String,
        pub description: Vec<LangString>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub struct Configuration {
        pub nodes: Vec<Node>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct Node {
        pub operator: String,
        pub negate: bool,
        pub cpe_match: Vec<CpeMatch>,
    }

    /// Go's `omitempty` strings: left out when empty.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct CpeMatch {
        pub vulnerable: bool,
        pub criteria: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub version_start_including: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub version_end_excluding: String,
        pub match_criteria_id: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub struct Reference {
        pub url: String,
        pub source: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub tags: Vec<String>,
    }

    /// `NewLargeCVE(nrefs, ncpe)` of the Go anchor.
    pub fn sample(nrefs: usize, ncpe: usize) -> Response {
        let s = |x: &str| x.to_string();
        let lang = |lang: &str, value: &str| LangString {
            lang: s(lang),
            value: s(value),
        };
        let cvss = CvssMetric {
            source: s("nvd@nist.gov"),
            kind: s("Primary"),
            cvss_data: CvssData {
                version: s("3.1"),
                vector_string: s("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H"),
                attack_vector: s("NETWORK"),
                attack_complexity: s("LOW"),
                privileges_required: s("NONE"),
                user_interaction: s("NONE"),
                scope: s("CHANGED"),
                confidentiality_impact: s("HIGH"),
                integrity_impact: s("HIGH"),
                availability_impact: s("HIGH"),
                base_score: 10.0,
                base_severity: s("CRITICAL"),
            },
            exploitability_score: 3.9,
            impact_score: 6.0,
        };
        Response {
            cve: Item {
                id: s("CVE-2021-44228"),
                source_identifier: s("security@apache.org"),
                published: s("2021-12-10T10:15:09.143"),
                last_modified: s("2024-07-24T17:08:24.167"),
                vuln_status: s("Analyzed"),
                descriptions: vec![
                    lang(
                        "en",
                        "Apache Log4j2 2.0-beta9 through 2.15.0 (excluding security releases \
                         2.12.2, 2.12.3, and 2.3.1) JNDI features used in configuration, log \
                         messages, and parameters do not protect against attacker controlled \
                         LDAP and other JNDI related endpoints. An attacker who can control log \
                         messages or log message parameters can execute arbitrary code loaded \
                         from LDAP servers when message lookup substitution is enabled.",
                    ),
                    lang(
                        "es",
                        "Las características JNDI de Apache Log4j2 2.0-beta9 hasta 2.15.0 \
                         (excluyendo las versiones de seguridad 2.12.2, 2.12.3 y 2.3.1) \
                         utilizadas en la configuración, los mensajes de registro y los \
                         parámetros no protegen contra LDAP controlado por un atacante y otros \
                         puntos finales relacionados con JNDI.",
                    ),
                ],
                metrics: HashMap::from([(s("cvssMetricV31"), vec![cvss])]),
                weaknesses: vec![
                    Weakness {
                        source: s("security@apache.org"),
                        kind: s("Secondary"),
                        description: vec![
                            lang("en", "CWE-20"),
                            lang("en", "CWE-400"),
                            lang("en", "CWE-502"),
                        ],
                    },
                    Weakness {
                        source: s("nvd@nist.gov"),
                        kind: s("Primary"),
                        description: vec![lang("en", "CWE-917")],
                    },
                ],
                configurations: vec![Configuration {
                    nodes: vec![Node {
                        operator: s("OR"),
                        negate: false,
                        cpe_match: (0..ncpe)
                            .map(|i| CpeMatch {
                                vulnerable: true,
                                criteria: format!(
                                    "cpe:2.3:a:apache:log4j:2.{}.{}:*:*:*:*:*:*:*",
                                    i / 10,
                                    i % 10
                                ),
                                version_start_including: s("2.0.1"),
                                version_end_excluding: format!("2.{}.0", i % 17),
                                match_criteria_id: format!(
                                    "{:08X}-1C5A-4B4B-9B8B-{:012X}",
                                    i * 7919,
                                    i * 104729
                                ),
                            })
                            .collect(),
                    }],
                }],
                references: (0..nrefs)
                    .map(|i| Reference {
                        url: format!(
                            "https://security.example.org/advisories/2021/log4j-{i:04}-remote-code-execution"
                        ),
                        source: s("security@apache.org"),
                        tags: vec![s("Third Party Advisory"), s("Mailing List"), s("Exploit")],
                    })
                    .collect(),
            },
        }
    }
}

/// The struct the quoted "~130 ns as a map" was measured with.
#[derive(Serialize, Deserialize)]
struct QuotedReference {
    kind: u8,
    id: u64,
    source: String,
    target: String,
    correlation: u64,
    #[serde(with = "serde_bytes")]
    payload: Vec<u8>,
}

/// The request a caller builds, as the Go anchor builds its message
/// (`NewRequestMessage(id, payload)`, then `msg.Source, msg.Target = …`):
/// fields set in place, and the names string literals, `from_static` here
/// (`Envelope::request("local", …)` would copy each `&str` into a new
/// `ByteString`: two allocations Go does not make). The protocol requires
/// `target` and `correlation_id` of every request, so the unrouted request
/// carries both where Go's leaves them out; `source` only when `routed`
/// (the broker stamps it on the way).
fn request<T: Serialize>(
    id: &'static str,
    routed: Option<(&'static str, &'static str)>,
    payload: &T,
) -> Envelope {
    let (source, target) = routed.unwrap_or(("", "local"));
    let mut request = Envelope::request(
        ByteString::from_static(target),
        ByteString::from_static(id),
        42,
    );
    request.source = ByteString::from_static(source);
    request.payload = Some(Payload::encode(payload).expect("payload"));
    request
}

/// build → encode → decode → typed payload, into a reused output buffer:
/// the Go anchor's `roundTripSmall` and `roundTripLarge`. The decoded item
/// is read where the codec returns it (matched by reference, not moved out).
#[inline(never)]
fn round_trip<T>(
    codec: &mut EnvelopeCodec,
    buf: &mut BytesMut,
    id: &'static str,
    routed: Option<(&'static str, &'static str)>,
    payload: &T,
) -> T
where
    T: Serialize + for<'de> Deserialize<'de>,
{
    let request = request(id, routed, payload);
    buf.clear();
    codec.encode(&request, buf).expect("encode");
    let item = codec.decode(buf);
    let Ok(Some(Ok(decoded))) = &item else {
        panic!("not one whole valid frame: {item:?}");
    };
    decoded.payload_as::<T>().expect("typed")
}

/// The broker's hop, the Go anchor's `BrokerRelay*` (`Unmarshal`, then
/// `Marshal`): decode the body, stamp source, encode the frame.
#[inline(never)]
fn relay(codec: &mut EnvelopeCodec, out: &mut BytesMut, body: &Bytes, stamp: &ByteString) {
    let mut decoded = Envelope::decode(body);
    let Ok(envelope) = &mut decoded else {
        panic!("not a valid envelope: {decoded:?}");
    };
    envelope.source = stamp.clone();
    out.clear();
    codec.encode(&*envelope, out).expect("encode");
}

/// The Go anchor's routed messages: `source`, `target` (and a correlation
/// id) filled in as on the wire.
const SMALL_ROUTE: (&str, &str) = ("access", "local");
const CVE_ROUTE: (&str, &str) = ("local", "access");

fn benches(c: &mut Criterion) {
    let small = Small {
        name: "test".into(),
        value: 123,
    };
    let cve = cve::sample(60, 40);
    let cve_body = request("RPCGetCVE", Some(CVE_ROUTE), &cve).to_bytes();
    let small_body = request("RPCGetCVE", Some(SMALL_ROUTE), &small).to_bytes();
    eprintln!(
        "envelope sizes: small {} B, CVE {} B",
        small_body.len(),
        cve_body.len()
    );
    // The anchor's CVE is 20 136 B of JSON; the same values take less as
    // MessagePack (no quotes, no braces, binary numbers).
    assert!(
        (15_000..24_000).contains(&cve_body.len()),
        "CVE payload ~20 KB of JSON"
    );

    let mut group = c.benchmark_group("codec");
    let mut codec = EnvelopeCodec::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);

    group.throughput(Throughput::Elements(1));
    group.bench_function("small_round_trip", |b| {
        b.iter(|| {
            black_box(round_trip(
                &mut codec,
                &mut buf,
                "req-1",
                None,
                black_box(&small),
            ))
        })
    });
    group.bench_function("small_round_trip_routed", |b| {
        b.iter(|| {
            black_box(round_trip(
                &mut codec,
                &mut buf,
                "req-1",
                Some(SMALL_ROUTE),
                black_box(&small),
            ))
        })
    });
    group.bench_function("cve_round_trip", |b| {
        b.iter(|| {
            black_box(round_trip(
                &mut codec,
                &mut buf,
                "RPCGetCVE",
                Some(CVE_ROUTE),
                black_box(&cve),
            ))
        })
    });

    let stamp = ByteString::from_static("client.7");
    group.bench_function("relay_small", |b| {
        b.iter(|| relay(&mut codec, &mut buf, black_box(&small_body), &stamp))
    });
    group.bench_function("relay_cve", |b| {
        b.iter(|| relay(&mut codec, &mut buf, black_box(&cve_body), &stamp))
    });

    let reference = QuotedReference {
        kind: 1,
        id: 7,
        source: "broker".into(),
        target: "worker-1".into(),
        correlation: 7,
        payload: vec![7; 64],
    };
    group.bench_function("reference_rmp_serde_named", |b| {
        b.iter(|| {
            let bytes = rmp_serde::to_vec_named(black_box(&reference)).expect("encode");
            let back: QuotedReference = rmp_serde::from_slice(&bytes).expect("decode");
            black_box(back)
        })
    });
    group.finish();
}

criterion_group!(codec_benches, benches);
criterion_main!(codec_benches);
