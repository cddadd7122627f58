//! Envoy ext_authz v3 `Check`: a thin adapter from `CheckRequest` to `AccessRequest` and from
//! `Decision` back to `CheckResponse`.
//!
//! Every policy outcome, denials included, is an OK gRPC response: a gRPC error tells Envoy that
//! the authorizer failed, and Envoy then applies `failure_mode_allow`. Denials carry their HTTP
//! status explicitly (Envoy would send 403 for an unset one).

use std::{collections::HashMap, sync::Arc};

use envoy_types::{
    ext_authz::v3::{
        CheckRequestExt,
        pb::{
            Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
            HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
        },
    },
    pb::google::{
        protobuf::{Struct, Value, value::Kind},
        rpc,
    },
};
use tonic::{Request, Response, Status};

use super::authorizer::Authorizer;
use crate::{
    decision::{Decision, Outcome},
    identity::CredentialProblem,
    policy::Upstream,
    request::{AccessRequest, Door, HttpAttributes, Peer, PresentedCredential},
};

/// gRPC status codes used in `CheckResponse.status` (google.rpc.Code).
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;
const RESOURCE_EXHAUSTED: i32 = 8;
const UNAUTHENTICATED: i32 = 16;

/// The `envoy.service.auth.v3.Authorization` service.
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    authorizer: Arc<Authorizer>,
}

impl ExtAuthz {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let access = access_request(request.into_inner());
        let (decision, policy) = self.authorizer.decide(&access, Door::Check).await;
        Ok(Response::new(check_response(&decision, &policy.upstream)))
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
        let mut headers: HashMap<String, String> =
            HashMap::with_capacity(h.headers.len() + raw_entries.len());
        for (key, value) in h.headers {
            headers.insert(lower_case(key), value);
        }
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
        HttpAttributes::new(&method, &host, &path, headers)
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
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        name.make_ascii_lowercase();
    }
    name
}

/// Renders a decision for Envoy. Identity headers of the policy that the decision does not set are
/// removed, so a client cannot smuggle its own `x-stepgate-subject` to the upstream.
pub fn check_response(decision: &Decision, upstream: &Upstream) -> CheckResponse {
    let metadata = Some(dynamic_metadata(decision));
    if decision.outcome == Outcome::Allow {
        let headers = decision
            .identity_headers
            .iter()
            .map(|(k, v)| header(k, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
            .collect();
        let headers_to_remove = upstream.headers_to_remove(&decision.identity_headers);
        return CheckResponse {
            status: Some(rpc::Status {
                code: OK,
                message: String::new(),
                details: Vec::new(),
            }),
            dynamic_metadata: metadata,
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers,
                headers_to_remove,
                ..Default::default()
            })),
        };
    }
    let code = match decision.http_status {
        400 => INVALID_ARGUMENT,
        401 => UNAUTHENTICATED,
        431 => RESOURCE_EXHAUSTED,
        _ => PERMISSION_DENIED,
    };
    let mut headers = vec![header(
        "content-type",
        "application/json",
        HeaderAppendAction::OverwriteIfExistsOrAdd,
    )];
    if let Some(www) = &decision.www_authenticate {
        headers.push(header(
            "www-authenticate",
            www,
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        ));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code,
            message: decision.reason.as_str().to_owned(),
            details: Vec::new(),
        }),
        dynamic_metadata: metadata,
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(decision.http_status),
            }),
            headers,
            body: denial_body(decision),
        })),
    }
}

/// `{"error": …, "reason": …, "rule": …, "message": …}`; `error` is the OAuth error code of the
/// challenge when there is one.
pub fn denial_body(decision: &Decision) -> String {
    let error = decision
        .www_authenticate
        .as_deref()
        .and_then(|www| www.split("error=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or(match decision.outcome {
            Outcome::StepUp => "insufficient_user_authentication",
            _ if decision.http_status == 401 => "unauthorized",
            _ => "access_denied",
        });
    serde_json::json!({
        "error": error,
        "reason": decision.reason.as_str(),
        "rule": decision.rule.as_deref(),
        "message": decision.message,
    })
    .to_string()
}

fn header(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

/// Fields for Envoy's access log and later filters, under `envoy.filters.http.ext_authz`.
fn dynamic_metadata(decision: &Decision) -> Struct {
    let mut fields = HashMap::new();
    let mut put = |k: &str, v: String| {
        fields.insert(
            k.to_owned(),
            Value {
                kind: Some(Kind::StringValue(v)),
            },
        );
    };
    put("stepgate.outcome", decision.outcome.as_str().to_owned());
    put("stepgate.reason", decision.reason.as_str().to_owned());
    put(
        "stepgate.rule",
        decision.rule.as_deref().unwrap_or_default().to_owned(),
    );
    if let Some(fp) = &decision.token_fingerprint {
        put("stepgate.token", fp.clone());
    }
    if let Some(p) = &decision.principal {
        put("stepgate.subject", p.subject.to_string());
        put("stepgate.issuer", p.issuer_id.to_string());
        if let Some(tid) = &p.tenant {
            put("stepgate.tenant", tid.to_string());
        }
        if !p.acrs.is_empty() {
            put("stepgate.auth_contexts", p.acrs.join(" "));
        }
    }
    Struct { fields }
}
