//! The decoder against envoy-types' prost decoder, on the same bytes: every field read must agree,
//! for hand-built requests, for random ones (each alone and two concatenated, which protobuf
//! merges), for every truncation, and for random corruptions (where the decoder must never panic
//! and may only refuse what prost refuses too).

use std::collections::{BTreeMap, HashMap};

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

/// What stepgate reads, as plain values, for comparing the two decoders.
#[derive(Debug, PartialEq, Eq)]
struct Read {
    http: Option<ReadHttp>,
    source: Option<(Option<String>, String)>,
    context: BTreeMap<String, String>,
}

#[derive(Debug, PartialEq, Eq)]
struct ReadHttp {
    method: String,
    path: String,
    host: String,
    /// `None` when two names differ only in case (prost keeps both, stepgate folds them).
    headers: Option<BTreeMap<String, String>>,
    raw: Vec<(String, String, Vec<u8>)>,
}

fn ours(request: &CheckRequest) -> Read {
    let http = request.http.as_ref().map(|h| ReadHttp {
        method: request.method().to_owned(),
        path: request.path().to_owned(),
        host: request.host().to_owned(),
        headers: Some(
            h.headers
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        ),
        raw: request
            .raw_headers()
            .map(|r| (r.key.to_owned(), r.value.to_owned(), r.raw_value.to_vec()))
            .collect(),
    });
    Read {
        http,
        source: request.source.as_ref().map(|_| {
            (
                request.source_address().map(str::to_owned),
                request.source_principal().unwrap_or_default().to_owned(),
            )
        }),
        context: request
            .context_extensions()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

fn theirs(request: &EnvoyCheckRequest) -> Read {
    let attributes = request.attributes.clone().unwrap_or_default();
    let http = attributes.request.and_then(|r| r.http).map(|h| {
        let folded: BTreeMap<String, String> = h
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        ReadHttp {
            method: h.method,
            path: h.path,
            host: h.host,
            headers: (folded.len() == h.headers.len()).then_some(folded),
            raw: h
                .header_map
                .map(|m| m.headers)
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.key, r.value, r.raw_value))
                .collect(),
        }
    });
    let source = attributes.source.map(|peer| {
        let ip = match peer.address.and_then(|a| a.address) {
            Some(EnvoyAddressKind::SocketAddress(socket)) => Some(socket.address),
            _ => None,
        };
        (ip, peer.principal)
    });
    Read {
        http,
        source,
        context: attributes.context_extensions.into_iter().collect(),
    }
}

/// Both decoders on `bytes`: equal reads when both accept; stepgate refuses only what prost
/// refuses too (groups aside, which stepgate refuses everywhere); never a panic.
fn agree(bytes: &[u8]) {
    let envoy = EnvoyCheckRequest::decode(bytes);
    match (CheckRequest::decode(Bytes::copy_from_slice(bytes)), envoy) {
        (Ok(ours_request), Ok(envoy)) => {
            let (mut a, b) = (ours(&ours_request), theirs(&envoy));
            // Where prost kept two names that fold together, compare everything but the headers.
            if let (Some(h), Some(t)) = (&mut a.http, &b.http)
                && t.headers.is_none()
            {
                h.headers = None;
            }
            assert_eq!(a, b, "bytes {bytes:02x?}");
        }
        (Ok(_), Err(_)) => {} // an unread field prost refused
        (Err(e), Ok(_)) => assert!(
            e.to_string().contains("groups are not used here"),
            "refused what prost accepts: {e}, bytes {bytes:02x?}"
        ),
        (Err(_), Err(_)) => {}
    }
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
                certificate: "skipped".into(),
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
    let request = CheckRequest::decode(Bytes::from(bytes.clone())).expect("decodes");
    assert_eq!(request.method(), "POST");
    assert_eq!(request.path(), "/accounts/42?x=1");
    assert_eq!(request.host(), "api.example.com:443");
    assert_eq!(request.source_address(), Some("10.1.2.3"));
    assert_eq!(
        request.source_principal(),
        Some("spiffe://cluster.local/ns/a/sa/b")
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
    let request = CheckRequest::decode(Bytes::new()).expect("decodes");
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
    let request = CheckRequest::decode(socket_then_pipe.clone().into()).expect("decodes");
    assert_eq!(request.source_address(), None);
    agree(&socket_then_pipe);
    let pipe_then_socket = [
        with_address(pipe).encode_to_vec(),
        with_address(socket("10.1.2.4")).encode_to_vec(),
    ]
    .concat();
    let request = CheckRequest::decode(pipe_then_socket.clone().into()).expect("decodes");
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
    let request = CheckRequest::decode(bytes.clone().into()).expect("decodes");
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
    let request = CheckRequest::decode(bytes.into()).expect("decodes");
    assert_eq!(request.method(), "GET");
}

#[test]
fn malformed_read_fields_are_refused_with_their_name() {
    let refused = |http: &[u8]| {
        CheckRequest::decode(nest(&[1, 4, 2], http).into())
            .expect_err("refused")
            .to_string()
    };
    // `method` not UTF-8.
    assert!(refused(&[0x12, 0x02, 0xff, 0xfe]).contains("attributes.request.http.method"));
    // A header name not UTF-8 (map entry {key = 1: ff}).
    assert!(refused(&[0x1a, 0x03, 0x0a, 0x01, 0xff]).contains("headers"));
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
