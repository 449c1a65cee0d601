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
use procbroker::protocol::{Envelope, EnvelopeCodec};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Small {
    name: String,
    value: i64,
}

/// An NVD 2.0 `vulnerabilities[]` item, trimmed to the fields v2e stores.
mod cve {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct Item {
        pub id: String,
        pub source_identifier: String,
        pub published: String,
        pub last_modified: String,
        pub vuln_status: String,
        pub descriptions: Vec<LangString>,
        pub metrics: Metrics,
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
    pub struct Metrics {
        pub cvss_metric_v31: Vec<CvssMetric>,
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

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    pub struct CpeMatch {
        pub vulnerable: bool,
        pub criteria: String,
        pub version_end_excluding: Option<String>,
        pub match_criteria_id: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    pub struct Reference {
        pub url: String,
        pub source: String,
        pub tags: Vec<String>,
    }

    /// 40 CPE matches, 60 references: about 20 KB of MessagePack.
    pub fn sample() -> Item {
        let s = |x: &str| x.to_string();
        Item {
            id: s("CVE-2024-21413"),
            source_identifier: s("secure@microsoft.com"),
            published: s("2024-02-13T18:15:49.633"),
            last_modified: s("2024-11-29T16:28:19.223"),
            vuln_status: s("Analyzed"),
            descriptions: vec![
                LangString {
                    lang: s("en"),
                    value: s("Microsoft Outlook Remote Code Execution Vulnerability. An attacker \
                              who exploits this vulnerability could bypass the Office Protected \
                              View and open in editing mode rather than protected mode."),
                },
                LangString {
                    lang: s("es"),
                    value: s("Vulnerabilidad de ejecución remota de código de Microsoft Outlook."),
                },
            ],
            metrics: Metrics {
                cvss_metric_v31: vec![CvssMetric {
                    source: s("secure@microsoft.com"),
                    kind: s("Primary"),
                    cvss_data: CvssData {
                        version: s("3.1"),
                        vector_string: s("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"),
                        attack_vector: s("NETWORK"),
                        attack_complexity: s("LOW"),
                        privileges_required: s("NONE"),
                        user_interaction: s("NONE"),
                        scope: s("UNCHANGED"),
                        confidentiality_impact: s("HIGH"),
                        integrity_impact: s("HIGH"),
                        availability_impact: s("HIGH"),
                        base_score: 9.8,
                        base_severity: s("CRITICAL"),
                    },
                    exploitability_score: 3.9,
                    impact_score: 5.9,
                }],
            },
            weaknesses: vec![Weakness {
                source: s("nvd@nist.gov"),
                kind: s("Primary"),
                description: vec![LangString {
                    lang: s("en"),
                    value: s("CWE-20"),
                }],
            }],
            configurations: vec![Configuration {
                nodes: vec![Node {
                    operator: s("OR"),
                    negate: false,
                    cpe_match: (0..40)
                        .map(|i| CpeMatch {
                            vulnerable: i % 3 != 0,
                            criteria: format!(
                                "cpe:2.3:a:microsoft:office_suite_{i}:2016:*:*:*:*:*:x64:*"
                            ),
                            version_end_excluding: (i % 2 == 0).then(|| format!("16.0.{i}.1000")),
                            match_criteria_id: format!("{:08X}-31B5-4F2C-9A7D-{:012X}", i * 7919, i),
                        })
                        .collect(),
                }],
            }],
            references: (0..60)
                .map(|i| Reference {
                    url: format!(
                        "https://msrc.microsoft.com/update-guide/vulnerability/CVE-2024-21413/advisories/2024/02/reference-{i}.html"
                    ),
                    source: s("secure@microsoft.com"),
                    tags: vec![s("Patch"), s("Vendor Advisory"), s("Third Party Advisory")],
                })
                .collect(),
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

/// build → encode → decode → typed payload, into a reused output buffer.
fn round_trip<T>(codec: &mut EnvelopeCodec, buf: &mut BytesMut, payload: &T) -> T
where
    T: Serialize + for<'de> Deserialize<'de>,
{
    let request = Envelope::request("echo", "Echo", 42)
        .with_source("client.0")
        .with_payload(payload)
        .expect("payload");
    buf.clear();
    codec.encode(&request, buf).expect("encode");
    let decoded = codec
        .decode(buf)
        .expect("in sync")
        .expect("whole")
        .expect("valid");
    decoded.payload_as::<T>().expect("typed")
}

/// The broker's hop: decode the body, stamp source, encode the frame.
fn relay(codec: &mut EnvelopeCodec, out: &mut BytesMut, body: &Bytes, stamp: &ByteString) {
    let mut envelope = Envelope::decode(body).expect("valid");
    envelope.source = stamp.clone();
    out.clear();
    codec.encode(&envelope, out).expect("encode");
}

fn body_of<T: Serialize>(payload: &T) -> Bytes {
    Envelope::request("echo", "Echo", 42)
        .with_source("client.0")
        .with_payload(payload)
        .expect("payload")
        .to_bytes()
}

fn benches(c: &mut Criterion) {
    let small = Small {
        name: "test".into(),
        value: 123,
    };
    let cve = cve::sample();
    let cve_body = body_of(&cve);
    let small_body = body_of(&small);
    eprintln!(
        "envelope sizes: small {} B, CVE {} B",
        small_body.len(),
        cve_body.len()
    );
    assert!(
        (18_000..24_000).contains(&cve_body.len()),
        "CVE payload ~20 KB"
    );

    let mut group = c.benchmark_group("codec");
    let mut codec = EnvelopeCodec::default();
    let mut buf = BytesMut::with_capacity(64 * 1024);

    group.throughput(Throughput::Elements(1));
    group.bench_function("small_round_trip", |b| {
        b.iter(|| black_box(round_trip(&mut codec, &mut buf, black_box(&small))))
    });
    group.bench_function("cve_round_trip", |b| {
        b.iter(|| black_box(round_trip(&mut codec, &mut buf, black_box(&cve))))
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
