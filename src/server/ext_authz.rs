//! Envoy ext_authz v3 `Check`: a thin adapter from `CheckRequest` to `AccessRequest` and from
//! `Decision` back to a `CheckResponse` (encoded by [`CheckAnswer`]).
//!
//! Every policy outcome, denials included, is an OK gRPC response: a gRPC error tells Envoy that
//! the authorizer failed, and Envoy then applies `failure_mode_allow`. Denials carry their HTTP
//! status explicitly (Envoy would send 403 for an unset one).
//!
//! The service is written out here rather than taken from envoy-types' generated
//! `AuthorizationServer`, whose handler must return envoy-types' own `CheckResponse`: stepgate
//! answers with [`CheckAnswer`], the same message encoded straight from the decision.

use std::{convert::Infallible, sync::Arc};

use envoy_types::ext_authz::v3::{CheckRequestExt, pb::CheckRequest};
use tonic::{
    Request, Response, Status,
    body::Body,
    codegen::{BoxFuture, Context, Poll, Service, http},
    server::{Grpc, NamedService, UnaryService},
};
use tonic_prost::ProstCodec;

use super::{answer::CheckAnswer, authorizer::Authorizer};
use crate::{
    identity::CredentialProblem,
    request::{AccessRequest, Door, HttpAttributes, Peer, PresentedCredential},
};

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The `envoy.service.auth.v3.Authorization` service (its one method, `Check`).
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    authorizer: Arc<Authorizer>,
}

impl ExtAuthz {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

impl NamedService for ExtAuthz {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl Service<http::Request<Body>> for ExtAuthz {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let check = Check(Arc::clone(&self.authorizer));
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<CheckAnswer, CheckRequest>::default());
            Ok(grpc.unary(check, request).await)
        })
    }
}

/// One `Check` call: decide, log, answer.
struct Check(Arc<Authorizer>);

impl UnaryService<CheckRequest> for Check {
    type Response = CheckAnswer;
    type Future = BoxFuture<Response<CheckAnswer>, Status>;

    fn call(&mut self, request: Request<CheckRequest>) -> Self::Future {
        let authorizer = Arc::clone(&self.0);
        Box::pin(async move {
            let access = access_request(request.into_inner());
            let (decision, policy) = authorizer.decide(&access, Door::Check).await;
            Ok(Response::new(CheckAnswer::new(decision, &policy)))
        })
    }
}

/// Reads a `CheckRequest` into the engine's view, moving its strings rather than copying them.
/// Headers come from `headers` or, when Envoy sets `encode_raw_headers`, from `header_map` (raw
/// bytes, duplicates as separate entries).
pub fn access_request(mut check: CheckRequest) -> AccessRequest {
    let client_address = check.get_client_address().cloned();
    let attributes = check.attributes.take().unwrap_or_default();
    let http = attributes.request.and_then(|r| r.http);
    let mut credential = PresentedCredential::None;
    let mut proxy_header_count = None;
    let http = http.map(|h| {
        let raw_entries = h.header_map.map(|m| m.headers).unwrap_or_default();
        proxy_header_count = Some(if raw_entries.is_empty() {
            h.headers.len()
        } else {
            raw_entries.len()
        });
        // Envoy sends lower-case names (HTTP/2 requires them), so the decoded map is kept as it
        // is rather than rebuilt; a name in another case makes it fold them all.
        let mut headers = if h.headers.keys().any(|k| has_upper_case(k)) {
            h.headers
                .into_iter()
                .map(|(key, value)| (lower_case(key), value))
                .collect()
        } else {
            h.headers
        };
        headers.reserve(raw_entries.len());
        let mut authorization_entries = 0;
        for entry in raw_entries {
            let key = lower_case(entry.key);
            let value = if entry.raw_value.is_empty() {
                Ok(entry.value)
            } else {
                String::from_utf8(entry.raw_value)
                    .map_err(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
            };
            if key == "authorization" {
                authorization_entries += 1;
                if value.is_err() {
                    credential = PresentedCredential::Unusable(CredentialProblem::InvalidBytes);
                }
            }
            let value = value.unwrap_or_else(|lossy| lossy);
            headers
                .entry(key)
                .and_modify(|v| {
                    v.push(',');
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        if authorization_entries > 1 {
            credential = PresentedCredential::Unusable(CredentialProblem::MultipleCredentials);
        }
        if credential == PresentedCredential::None
            && let Some(value) = headers.get("authorization")
        {
            credential = PresentedCredential::Authorization(value.clone());
        }
        let pseudo = |given: String, name: &str| {
            if given.is_empty() {
                headers.get(name).cloned().unwrap_or_default()
            } else {
                given
            }
        };
        let method = pseudo(h.method, ":method");
        let host = pseudo(h.host, ":authority");
        let path = pseudo(h.path, ":path");
        HttpAttributes::new(method, &host, path, headers)
    });
    let context: serde_json::Map<String, serde_json::Value> = attributes
        .context_extensions
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let operation = context
        .get("operation")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let source = attributes.source.map(|peer| Peer {
        address: client_address.unwrap_or_default(),
        principal: peer.principal,
    });
    AccessRequest {
        credential,
        operation,
        http,
        attributes: serde_json::Map::new(),
        context,
        source,
        proxy_header_count,
        explain: false,
    }
}

/// Envoy sends header names in lower case (HTTP/2 requires it); anything else is folded here.
fn lower_case(mut name: String) -> String {
    if has_upper_case(&name) {
        name.make_ascii_lowercase();
    }
    name
}

fn has_upper_case(name: &str) -> bool {
    name.bytes().any(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext,
        attribute_context::{HttpRequest, Request as EnvoyRequest},
    };

    use super::*;
    use crate::policy::testing::{DEMO_POLICY, compile_policy};

    fn check_with_headers(headers: &[(&str, &str)]) -> CheckRequest {
        let headers: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(EnvoyRequest {
                    time: None,
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/accounts/42".into(),
                        host: "api.example.com:443".into(),
                        headers,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn lower_case_header_names_are_taken_as_decoded() {
        let access = access_request(check_with_headers(&[
            ("authorization", "Bearer abc"),
            ("x-request-id", "1"),
        ]));
        let http = access.http.expect("http attributes");
        assert_eq!(http.headers.len(), 2);
        assert_eq!(http.headers["x-request-id"], "1");
        assert_eq!(
            (http.method.as_str(), http.host.as_str()),
            ("GET", "api.example.com")
        );
        assert_eq!(http.target, "/accounts/42");
        assert_eq!(
            access.credential,
            PresentedCredential::Authorization("Bearer abc".into())
        );
        assert_eq!(access.proxy_header_count, Some(2));
    }

    #[test]
    fn header_names_in_another_case_are_folded() {
        let access = access_request(check_with_headers(&[
            ("Authorization", "Bearer abc"),
            ("X-Request-Id", "1"),
        ]));
        let http = access.http.expect("http attributes");
        let mut names: Vec<&str> = http.headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["authorization", "x-request-id"]);
        assert_eq!(
            access.credential,
            PresentedCredential::Authorization("Bearer abc".into())
        );
    }

    #[tokio::test]
    async fn other_methods_of_the_service_are_unimplemented() {
        let policy = compile_policy(DEMO_POLICY);
        let mut service = ExtAuthz::new(Arc::new(Authorizer::new(Arc::new(policy))));
        let request = http::Request::builder()
            .uri("/envoy.service.auth.v3.Authorization/Report")
            .body(Body::empty())
            .unwrap();
        let response = service.call(request).await.unwrap();
        assert_eq!(
            response.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"12"[..]),
            "{response:?}"
        );
    }
}
