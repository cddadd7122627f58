//! The decoder against envoy-types' prost decoder, on the same bytes: every field read must agree,
//! for hand-built requests, for random ones (each alone and two concatenated, which protobuf
//! merges), for every truncation, and for random corruptions (where the decoder must never panic
//! and may only refuse what prost refuses too).

use std::collections::HashMap;

use envoy_types::pb::envoy::{
    config::core::v3::{
        Address as EnvoyAddress, HeaderMap, HeaderValue, Pipe, SocketAddress,
        address::Address as EnvoyAddressKind, socket_address::PortSpecifier,
    },
    service::auth::v3::{
        AttributeContext, CheckRequest as EnvoyCheckRequest,
        attribute_context::{HttpRequest as EnvoyHttp, Peer as EnvoyPeer, Request as EnvoyRequest},
    },
};
use prost::Message as _;

use super::*;
use crate::fuzzing::check_request::{check as agree, ours, theirs};

/// Reads `bytes` with no header limits.
fn decode(bytes: impl Into<Bytes>) -> Result<CheckRequest, DecodeError> {
    CheckRequest::decode(bytes.into(), HeaderLimits::UNLIMITED)
}

fn socket(ip: &str) -> EnvoyAddress {
    EnvoyAddress {
        address: Some(EnvoyAddressKind::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(PortSpecifier::PortValue(443)),
            ..Default::default()
        })),
    }
}

/// Every field that stepgate reads, and many that it skips.
fn full_request() -> EnvoyCheckRequest {
    EnvoyCheckRequest {
        attributes: Some(AttributeContext {
            source: Some(EnvoyPeer {
                address: Some(socket("10.1.2.3")),
                principal: "spiffe://cluster.local/ns/a/sa/b".into(),
                service: "skipped".into(),
                certificate:
                    "-----BEGIN%20CERTIFICATE-----%0AAAEC%0A-----END%20CERTIFICATE-----%0A".into(),
                labels: [("app".to_owned(), "skipped".to_owned())].into(),
            }),
            destination: Some(EnvoyPeer {
                address: Some(socket("10.9.9.9")),
                principal: "destination".into(),
                ..Default::default()
            }),
            request: Some(EnvoyRequest {
                time: Some(Default::default()),
                http: Some(EnvoyHttp {
                    id: "1".into(),
                    method: "POST".into(),
                    headers: [
                        ("authorization", "Bearer t"),
                        (":path", "/p"),
                        ("x-ü", "wert ✓"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
                    header_map: Some(HeaderMap {
                        headers: vec![HeaderValue {
                            key: "x-raw".into(),
                            value: String::new(),
                            raw_value: b"\xffbytes".to_vec(),
                        }],
                    }),
                    path: "/accounts/42?x=1".into(),
                    host: "api.example.com:443".into(),
                    scheme: "https".into(),
                    query: "x=1".into(),
                    protocol: "HTTP/2".into(),
                    size: 12,
                    body: "skipped".into(),
                    raw_body: b"skipped".to_vec(),
                    ..Default::default()
                }),
            }),
            context_extensions: [("operation".to_owned(), "payments.transfer".to_owned())].into(),
            metadata_context: Some(Default::default()),
            ..Default::default()
        }),
    }
}

#[test]
fn every_field_read_agrees_with_envoy_types() {
    let envoy = full_request();
    let bytes = envoy.encode_to_vec();
    let request = decode(bytes.clone()).expect("decodes");
    assert_eq!(request.method(), "POST");
    assert_eq!(request.path(), "/accounts/42?x=1");
    assert_eq!(request.host(), "api.example.com:443");
    assert_eq!(request.source_address(), Some("10.1.2.3"));
    assert_eq!(
        request.source_principal(),
        Some("spiffe://cluster.local/ns/a/sa/b")
    );
    assert_eq!(
        request.source_certificate(),
        Some("-----BEGIN%20CERTIFICATE-----%0AAAEC%0A-----END%20CERTIFICATE-----%0A")
    );
    let headers = &request.http.as_ref().expect("http").headers;
    assert_eq!(headers.get("x-ü"), Some("wert ✓"));
    assert_eq!(headers.len(), 3);
    let raw: Vec<_> = request.raw_headers().collect();
    assert_eq!(
        (raw[0].key, raw[0].value, raw[0].raw_value),
        ("x-raw", "", &b"\xffbytes"[..])
    );
    assert_eq!(
        request.context_extensions().collect::<Vec<_>>(),
        [("operation", "payments.transfer")]
    );
    assert_eq!(ours(&request), theirs(&envoy));
}

#[test]
fn an_empty_request_reads_as_nothing() {
    let request = decode(Bytes::new()).expect("decodes");
    assert!(request.http.is_none() && request.source.is_none());
    assert_eq!(
        (request.method(), request.path(), request.host()),
        ("", "", "")
    );
    assert_eq!(request.source_address(), None);
}

#[test]
fn a_later_address_of_another_kind_replaces_the_socket_address() {
    let with_address = |address: EnvoyAddress| EnvoyCheckRequest {
        attributes: Some(AttributeContext {
            source: Some(EnvoyPeer {
                address: Some(address),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let pipe = EnvoyAddress {
        address: Some(EnvoyAddressKind::Pipe(Pipe {
            path: "/run/envoy.sock".into(),
            mode: 0,
        })),
    };
    let socket_then_pipe = [
        with_address(socket("10.1.2.3")).encode_to_vec(),
        with_address(pipe.clone()).encode_to_vec(),
    ]
    .concat();
    let request = decode(socket_then_pipe.clone()).expect("decodes");
    assert_eq!(request.source_address(), None);
    agree(&socket_then_pipe);
    let pipe_then_socket = [
        with_address(pipe).encode_to_vec(),
        with_address(socket("10.1.2.4")).encode_to_vec(),
    ]
    .concat();
    let request = decode(pipe_then_socket.clone()).expect("decodes");
    assert_eq!(request.source_address(), Some("10.1.2.4"));
    agree(&pipe_then_socket);
}

#[test]
fn a_repeated_header_name_keeps_its_last_value() {
    let one = |value: &str| {
        EnvoyCheckRequest {
            attributes: Some(AttributeContext {
                request: Some(EnvoyRequest {
                    time: None,
                    http: Some(EnvoyHttp {
                        headers: [("x-a".to_owned(), value.to_owned())].into(),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    };
    let bytes = [one("first"), one("second")].concat();
    let request = decode(bytes.clone()).expect("decodes");
    let headers = &request.http.as_ref().expect("http").headers;
    assert_eq!(headers.get("x-a"), Some("second"));
    assert_eq!(headers.count("x-a"), 2);
    agree(&bytes);
}

#[test]
fn unread_fields_are_not_checked() {
    // `attributes.request.http.id` (field 1) holding bytes that are not UTF-8, then `method`.
    let http = [0x0a, 0x02, 0xff, 0xfe, 0x12, 0x03, b'G', b'E', b'T'];
    let bytes = nest(&[1, 4, 2], &http);
    assert!(EnvoyCheckRequest::decode(&bytes[..]).is_err());
    let request = decode(bytes).expect("decodes");
    assert_eq!(request.method(), "GET");
}

#[test]
fn malformed_frames_are_refused_with_the_field_named() {
    let refused = |http: &[u8]| {
        decode(nest(&[1, 4, 2], http))
            .expect_err("refused")
            .to_string()
    };
    // `path` as a varint.
    assert!(refused(&[0x20, 0x01]).contains("attributes.request.http.path: wire type Varint"));
    // A length past the end.
    assert!(refused(&[0x22, 0x05, b'/']).contains("runs past the end"));
    // A group.
    assert!(refused(&[0x33, 0x34]).contains("groups are not used here"));
    // A varint that never ends, one that overflows.
    assert!(refused(&[0x08, 0x80]).contains("truncated varint"));
    assert!(
        refused(&[
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02
        ])
        .contains("overflows")
    );
    // Field number 0.
    assert!(refused(&[0x02, 0x00]).contains("invalid field number 0"));
}

#[test]
fn text_that_is_not_utf8_is_a_problem_to_answer_not_a_refused_frame() {
    let problem = |http: &[u8]| {
        decode(nest(&[1, 4, 2], http))
            .expect("a well-formed frame reads")
            .problem
    };
    let not_utf8 = |field| Some(RequestProblem::NotUtf8(field));
    // `method` not UTF-8.
    assert_eq!(
        problem(&[0x12, 0x02, 0xff, 0xfe]),
        not_utf8("attributes.request.http.method")
    );
    // `host` not UTF-8.
    assert_eq!(
        problem(&[0x2a, 0x01, 0xff]),
        not_utf8("attributes.request.http.host")
    );
    // `path`: answered as an invalid path.
    assert_eq!(
        problem(&[0x22, 0x02, b'/', 0xff]),
        not_utf8(RequestProblem::PATH_FIELD)
    );
    // A header name, then a value, not UTF-8 (map entry {key = 1, value = 2}).
    assert_eq!(
        problem(&[0x1a, 0x03, 0x0a, 0x01, 0xff]),
        not_utf8("attributes.request.http.headers")
    );
    assert_eq!(
        problem(&[0x1a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, 0xc0]),
        not_utf8("attributes.request.http.headers")
    );
    // The first such field is the one named; the fields after it are still read.
    let request = decode(nest(
        &[1, 4, 2],
        &[0x12, 0x01, 0xff, 0x22, 0x01, 0xfe, 0x2a, 0x01, b'h'],
    ))
    .unwrap();
    assert_eq!(request.problem, not_utf8("attributes.request.http.method"));
    assert_eq!(
        (request.method(), request.path(), request.host()),
        ("", "", "h")
    );
}

/// A request whose `headers` map holds `count` entries `x-<i>: <value>`.
fn with_headers(count: usize, value: &str) -> Vec<u8> {
    EnvoyCheckRequest {
        attributes: Some(AttributeContext {
            request: Some(EnvoyRequest {
                time: None,
                http: Some(EnvoyHttp {
                    headers: (0..count)
                        .map(|i| (format!("x-{i}"), value.to_owned()))
                        .collect(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

#[test]
fn headers_past_the_limits_are_counted_not_kept() {
    let limits = HeaderLimits {
        max_count: 10,
        max_bytes: 1024,
        ..HeaderLimits::DEFAULT
    };
    let read = |bytes: Vec<u8>| CheckRequest::decode(bytes.into(), limits).expect("reads");
    let within = read(with_headers(10, "v"));
    assert_eq!(within.problem, None);
    assert_eq!(within.http.as_ref().unwrap().headers.len(), 10);

    let many = read(with_headers(5000, "v"));
    assert_eq!(
        many.problem,
        Some(RequestProblem::TooManyHeaders {
            count: 5000,
            limit: 10
        })
    );
    assert_eq!(
        many.http.as_ref().unwrap().headers.len(),
        10,
        "no more kept"
    );

    let large = read(with_headers(3, &"v".repeat(600)));
    assert!(
        matches!(
            large.problem,
            Some(RequestProblem::HeadersTooLarge { bytes, limit: 1024 }) if bytes > 1800
        ),
        "{:?}",
        large.problem
    );
    assert_eq!(large.http.as_ref().unwrap().headers.len(), 1);

    // `header_map` entries count against the same limits.
    let mut raw = full_request();
    let http = raw.attributes.as_mut().unwrap().request.as_mut().unwrap();
    http.http.as_mut().unwrap().header_map = Some(HeaderMap {
        headers: (0..20)
            .map(|i| HeaderValue {
                key: format!("x-{i}"),
                value: String::new(),
                raw_value: b"v".to_vec(),
            })
            .collect(),
    });
    let raw = read(raw.encode_to_vec());
    assert!(matches!(
        raw.problem,
        Some(RequestProblem::TooManyHeaders { count: 23, .. })
    ));
    assert!(raw.raw_header_count() + raw.http.as_ref().unwrap().headers.len() <= 10);
}

#[test]
fn context_extensions_past_what_is_kept_are_a_problem() {
    let mut request = full_request();
    request.attributes.as_mut().unwrap().context_extensions = (0..MAX_CONTEXT_EXTENSIONS + 1)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let read = decode(request.encode_to_vec()).unwrap();
    assert_eq!(
        read.problem,
        Some(RequestProblem::TooManyEntries(
            "attributes.context_extensions"
        ))
    );
    assert_eq!(read.context_extensions().count(), MAX_CONTEXT_EXTENSIONS);
}

/// `inner` as the content of the message at `path` (field numbers, outermost first), each level
/// length-delimited.
fn nest(path: &[u32], inner: &[u8]) -> Vec<u8> {
    path.iter().rev().fold(inner.to_vec(), |content, &field| {
        let mut out = Vec::new();
        prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
        prost::encoding::encode_varint(content.len() as u64, &mut out);
        out.extend(content);
        out
    })
}

#[test]
fn every_truncation_agrees_or_is_refused() {
    let bytes = full_request().encode_to_vec();
    for end in 0..bytes.len() {
        agree(&bytes[..end]);
    }
}

/// A small deterministic generator (xorshift64*), so that a failure repeats.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }

    fn text(&mut self) -> String {
        const PIECES: [&str; 8] = ["a", "b", "x-", ":", "é", "✓", "/", " "];
        (0..self.below(6))
            .map(|_| PIECES[self.below(PIECES.len() as u64) as usize])
            .collect()
    }

    /// Lower-case names from a small set, so that they repeat.
    fn name(&mut self) -> String {
        const NAMES: [&str; 6] = ["authorization", ":path", "x-a", "x-b", "host", ""];
        NAMES[self.below(NAMES.len() as u64) as usize].to_owned()
    }

    fn request(&mut self) -> EnvoyCheckRequest {
        let peer = |r: &mut Self| {
            let address = match r.below(4) {
                0 => None,
                1 => Some(EnvoyAddress {
                    address: Some(EnvoyAddressKind::Pipe(Pipe {
                        path: r.text(),
                        mode: 0,
                    })),
                }),
                _ => Some(socket(&r.text())),
            };
            EnvoyPeer {
                address,
                principal: r.text(),
                service: r.text(),
                certificate: r.text(),
                ..Default::default()
            }
        };
        let http = |r: &mut Self| EnvoyHttp {
            id: r.text(),
            method: r.text(),
            headers: (0..r.below(5)).map(|_| (r.name(), r.text())).collect(),
            header_map: r.chance(3).then(|| HeaderMap {
                headers: (0..r.below(4))
                    .map(|_| HeaderValue {
                        key: r.name(),
                        value: r.text(),
                        raw_value: (0..r.below(4)).map(|_| r.next() as u8).collect(),
                    })
                    .collect(),
            }),
            path: r.text(),
            host: r.text(),
            size: r.next() as i64,
            ..Default::default()
        };
        EnvoyCheckRequest {
            attributes: (!self.chance(8)).then(|| AttributeContext {
                source: self.chance(2).then(|| peer(self)),
                destination: self.chance(2).then(|| peer(self)),
                request: (!self.chance(6)).then(|| EnvoyRequest {
                    time: None,
                    http: (!self.chance(6)).then(|| http(self)),
                }),
                context_extensions: (0..self.below(3))
                    .map(|_| (self.name(), self.text()))
                    .collect::<HashMap<_, _>>(),
                ..Default::default()
            }),
        }
    }
}

#[test]
fn random_requests_alone_and_merged_agree() {
    let mut random = Random(0x5eed_cafe_f00d_0001);
    for _ in 0..3000 {
        let first = random.request().encode_to_vec();
        agree(&first);
        let second = random.request().encode_to_vec();
        agree(&[first, second].concat());
    }
}

#[test]
fn corrupted_requests_never_panic_and_are_refused_only_with_prost() {
    let mut random = Random(0x5eed_cafe_f00d_0002);
    for _ in 0..3000 {
        let mut bytes = random.request().encode_to_vec();
        if bytes.is_empty() {
            continue;
        }
        for _ in 0..=random.below(3) {
            let at = random.below(bytes.len() as u64) as usize;
            bytes[at] = random.next() as u8;
        }
        agree(&bytes);
    }
}
