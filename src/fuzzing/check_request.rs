//! The `CheckRequest` reader (`server::check_request`) against envoy-types' prost decoding of the
//! same bytes: the same fields and header values wherever both accept, a refusal only where prost
//! refuses too (or for what stepgate refuses by design: groups, past a limit), and headers kept
//! within the limits whatever the frame holds.

use std::collections::BTreeMap;

use bytes::Bytes;
use envoy_types::pb::envoy::{
    config::core::v3::address::Address as EnvoyAddressKind,
    service::auth::v3::CheckRequest as EnvoyCheckRequest,
};
use prost::Message as _;

use crate::{
    request::{HeaderLimits, RequestProblem},
    server::check_request::CheckRequest,
};

/// What stepgate reads, as plain values, for comparing the two decoders.
#[derive(Debug, PartialEq, Eq)]
pub struct Read {
    http: Option<ReadHttp>,
    /// Address, principal and certificate (empty: none).
    source: Option<(Option<String>, String, String)>,
    context: BTreeMap<String, String>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ReadHttp {
    method: String,
    path: String,
    host: String,
    /// `None` when two names differ only in case (prost keeps both, stepgate folds them).
    headers: Option<BTreeMap<String, String>>,
    raw: Vec<(String, String, Vec<u8>)>,
}

pub fn ours(request: &CheckRequest) -> Read {
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
                request.source_certificate().unwrap_or_default().to_owned(),
            )
        }),
        context: request
            .context_extensions()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    }
}

pub fn theirs(request: &EnvoyCheckRequest) -> Read {
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
        (ip, peer.principal, peer.certificate)
    });
    Read {
        http,
        source,
        context: attributes.context_extensions.into_iter().collect(),
    }
}

/// Both decoders on `bytes`: equal reads when both accept; stepgate refuses only what prost
/// refuses too (groups aside, which stepgate refuses everywhere); never a panic. Then the same
/// bytes under small header limits: never more entries kept than the limits allow.
pub fn check(bytes: &[u8]) {
    let envoy = EnvoyCheckRequest::decode(bytes);
    let ours_request = CheckRequest::decode(Bytes::copy_from_slice(bytes), HeaderLimits::UNLIMITED);
    match (&ours_request, envoy) {
        (Ok(request), Ok(envoy)) => match &request.problem {
            None => {
                let (mut a, b) = (ours(request), theirs(&envoy));
                // Where prost kept two names that fold together, compare all but the headers.
                if let (Some(h), Some(t)) = (&mut a.http, &b.http)
                    && t.headers.is_none()
                {
                    h.headers = None;
                }
                assert_eq!(a, b, "bytes {bytes:02x?}");
            }
            Some(RequestProblem::TooManyEntries(_)) => {}
            Some(problem) => panic!("{problem:?} where prost accepts, bytes {bytes:02x?}"),
        },
        // Not UTF-8 in a field read as text: prost refuses the whole message.
        (Ok(_), Err(_)) => {}
        (Err(e), Ok(_)) => assert!(
            e.to_string().contains("groups are not used here"),
            "refused what prost accepts: {e}, bytes {bytes:02x?}"
        ),
        (Err(_), Err(_)) => {}
    }
    check_limits(bytes, ours_request.ok().as_ref());
}

/// Under tight limits the reader keeps at most the limits' worth of header entries and bytes,
/// and says so exactly when the unlimited reading had more.
fn check_limits(bytes: &[u8], unlimited: Option<&CheckRequest>) {
    let limits = HeaderLimits {
        max_count: 3,
        max_bytes: 40,
        ..HeaderLimits::DEFAULT
    };
    let Ok(limited) = CheckRequest::decode(Bytes::copy_from_slice(bytes), limits) else {
        assert!(
            unlimited.is_none(),
            "limits changed whether the frame reads"
        );
        return;
    };
    let unlimited = unlimited.expect("limits changed whether the frame reads");
    let (count, size) = kept(&limited);
    assert!(count <= limits.max_count, "{count} entries kept");
    assert!(size <= limits.max_bytes, "{size} bytes kept");
    let (all, all_bytes) = kept(unlimited);
    let over = all > limits.max_count || all_bytes > limits.max_bytes;
    let refused = matches!(
        limited.problem,
        Some(RequestProblem::TooManyHeaders { .. } | RequestProblem::HeadersTooLarge { .. })
    );
    // A problem noted first (not UTF-8) takes precedence over the limits.
    if unlimited.problem.is_none() {
        assert_eq!(
            refused, over,
            "{all} entries, {all_bytes} bytes: {:?}",
            limited.problem
        );
    }
}

/// Header entries kept (`headers` and `header_map` together) and their bytes.
fn kept(request: &CheckRequest) -> (usize, usize) {
    let headers = request.http.as_ref().map(|h| &h.headers);
    let count = headers.map_or(0, |h| h.len()) + request.raw_header_count();
    let bytes = headers.map_or(0, |h| {
        h.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }) + request
        .raw_headers()
        .map(|r| r.key.len() + r.value.len() + r.raw_value.len())
        .sum::<usize>();
    (count, bytes)
}

/// Starting points for the fuzzer: requests as Envoy sends them (merged headers and the raw
/// header map, with and without a token), one with every field read, and two concatenated.
pub fn seeds() -> Vec<Vec<u8>> {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln";
    let allow = crate::demo::envoy_check_request("GET", "api.example.com", "/accounts/42", token);
    let post =
        crate::demo::envoy_check_request("POST", "api.example.com:443", "/payments/wire?x=1", "");
    let mut raw = allow.clone();
    let http = raw
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("http attributes");
    let headers = std::mem::take(&mut http.headers);
    http.header_map = Some(HeaderMap {
        headers: headers
            .into_iter()
            .map(|(key, value)| HeaderValue {
                key,
                value: String::new(),
                raw_value: value.into_bytes(),
            })
            .collect(),
    });
    let mut context = post.clone();
    context
        .attributes
        .as_mut()
        .expect("attributes")
        .context_extensions
        .insert("operation".into(), "payments.wire_transfer".into());
    let merged = [allow.encode_to_vec(), context.encode_to_vec()].concat();
    vec![
        allow.encode_to_vec(),
        post.encode_to_vec(),
        raw.encode_to_vec(),
        context.encode_to_vec(),
        merged,
        Vec::new(),
    ]
}
