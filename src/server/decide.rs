//! `stepgate.v1.DecisionService/Decide`: a thin adapter from `DecideRequest` to `AccessRequest` and
//! from `Decision` back to `DecideResponse`. Every request that arrives as a `DecideRequest` is
//! answered with a decision, an unusable one too (a `400` denial naming what is wrong), and so is
//! a panic while deciding (`500 internal_error`): a gRPC error means stepgate itself could not
//! answer, and a caller may treat that differently.

use std::{sync::Arc, time::Instant};

use serde_json::Map;
use tonic::{Request, Response, Status};

use super::{
    authorizer::Authorizer,
    catch_panic::catch_panic,
    conn::{ListenerKind, PeerInfo},
};
use crate::{
    api::{
        self, codec,
        v1::{
            self, DecideRequest, DecideResponse, decide_request,
            decision_service_server::DecisionService,
        },
    },
    decision::{Decision, Outcome},
    identity::{ClientCertificate, Credential, CredentialProblem, bearer},
    policy::Upstream,
    request::{
        AccessRequest, Door, HeaderLimits, Headers, HttpAttributes, PresentedCredential,
        RequestProblem,
    },
    telemetry::traces,
};

/// The one explain step a caller the policy does not name gets instead of the trace.
pub const EXPLAIN_REFUSED: &str = "not permitted for this caller: the policy's `explain` section \
                                   names who may ask (client_sans over mutual TLS, or \
                                   admin_listener: true for --admin-listen)";

/// The `Decide` call's path.
pub const DECIDE_PATH: &str = "/stepgate.v1.DecisionService/Decide";

/// A `Decide` call refused before its message reaches the decoder (server/calls.rs reads it
/// first, as `Check`'s is read): not one whole message (two, none, one cut short: readers would
/// differ on which to decide), one over `--max-decide-message-bytes`, or the process's buffer
/// budget full. Answered as every request stepgate cannot decide on: a DENY, logged, counted and
/// recorded, as a gRPC message frame with an OK status.
pub fn refusal_frame(
    authorizer: &Authorizer,
    started: Instant,
    http_status: u16,
    reason: crate::decision::Reason,
    message: &'static str,
) -> bytes::Bytes {
    use prost::Message as _;
    let refusal = Decision::refusal(http_status, reason, message);
    let (decision, policy) = authorizer.refused(crate::request::Door::Decide, started, refusal);
    super::grpc_message::frame(&decide_response(&decision, &policy.upstream).encode_to_vec())
}

#[derive(Debug, Clone)]
pub struct Decide {
    authorizer: Arc<Authorizer>,
}

impl Decide {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

#[tonic::async_trait]
impl DecisionService for Decide {
    async fn decide(
        &self,
        request: Request<DecideRequest>,
    ) -> Result<Response<DecideResponse>, Status> {
        let started = Instant::now();
        let authorizer = &self.authorizer;
        // One policy reads the call, judges its explain permission and decides it.
        let policy = authorizer.snapshot();
        let explain_permitted = request.get_ref().explain && {
            let peer = request.extensions().get::<PeerInfo>();
            let on_admin = peer.is_some_and(|p| p.listener == ListenerKind::Admin);
            let sans = peer
                .and_then(|p| p.client.as_deref())
                .map_or(&[][..], |c| &c.sans[..]);
            policy.explain.permits(on_admin, sans)
        };
        let metadata = request.metadata();
        let parent = traces::parent(|name| metadata.get(name).and_then(|v| v.to_str().ok()));
        let response = catch_panic(Box::pin(async {
            let mut access = access_request(request.into_inner(), policy.header_limits);
            let refused = access.explain && !explain_permitted;
            access.explain &= explain_permitted;
            let (decision, policy) = authorizer
                .decide_traced_under(policy, &access, Door::Decide, parent)
                .await;
            let mut response = decide_response(&decision, &policy.upstream);
            if refused {
                response.explain = vec![v1::ExplainStep {
                    stage: "explain".to_owned(),
                    detail: EXPLAIN_REFUSED.to_owned(),
                }];
            }
            response
        }))
        .await
        .unwrap_or_else(|panic: String| {
            let (decision, policy) = authorizer.failed(Door::Decide, started, &panic);
            decide_response(&decision, &policy.upstream)
        });
        Ok(Response::new(response))
    }
}

/// Reads a `DecideRequest`. What cannot be decided on (neither an operation nor an HTTP request,
/// headers past `limits`) is noted as the request's problem, answered with a denial.
pub fn access_request(request: DecideRequest, limits: HeaderLimits) -> AccessRequest {
    if request.operation == codec::UNDECODABLE {
        return AccessRequest {
            problem: Some(RequestProblem::Undecodable),
            ..AccessRequest::default()
        };
    }
    let operation = Some(request.operation).filter(|o| !o.is_empty());
    let mut problem = None;
    let http = request.http.map(|h| {
        let count = h.headers.len();
        let bytes: usize = h.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if count > limits.max_count {
            problem = Some(RequestProblem::TooManyHeaders {
                count,
                limit: limits.max_count,
            });
        } else if bytes > limits.max_bytes {
            problem = Some(RequestProblem::HeadersTooLarge {
                bytes,
                limit: limits.max_bytes,
            });
        }
        // `Headers` folds the names to lower case. The request's map holds each name once as
        // given, so two entries that fold to one name are two values for one header, read in the
        // map's random order: refused rather than decided by chance.
        let headers: Headers = h.headers.into_iter().collect();
        if let Some(name) = duplicate_name(&headers) {
            problem.get_or_insert(RequestProblem::DuplicateHeader(name));
        }
        HttpAttributes::with_pseudo_headers(h.method, h.host, h.path, headers)
    });
    if operation.is_none() && http.is_none() {
        problem = Some(RequestProblem::NothingToMatch);
    }
    let header_value = http
        .as_ref()
        .and_then(|h| h.headers.get("authorization").map(str::to_owned));
    let credential = match (request.credential, header_value) {
        (None, None) => PresentedCredential::None,
        (None, Some(value)) => PresentedCredential::Authorization(value),
        (Some(decide_request::Credential::Token(token)), header) => {
            // The same token in the field and in the header is one credential; anything else in
            // the header (another token, another scheme, a token this one merely ends) is two.
            let same = |header: &str| match bearer::from_authorization(header) {
                Credential::Missing => true,
                Credential::Bearer(in_header) => in_header == token,
                Credential::Malformed(_) => false,
            };
            if header.as_deref().is_none_or(same) {
                PresentedCredential::Token(token)
            } else {
                PresentedCredential::Unusable(CredentialProblem::MultipleCredentials)
            }
        }
        (Some(decide_request::Credential::Authorization(value)), header) => {
            if header.is_some_and(|h| h != value) {
                PresentedCredential::Unusable(CredentialProblem::MultipleCredentials)
            } else {
                PresentedCredential::Authorization(value)
            }
        }
    };
    // Counted before anything is made of them: past the bounds, not converted at all.
    let attributes = match request.attributes {
        Some(attributes) => match api::struct_within(
            &attributes,
            limits.max_attribute_values,
            limits.max_attribute_bytes,
        ) {
            Ok(()) => api::struct_to_json(attributes),
            Err(what) => {
                problem.get_or_insert(RequestProblem::AttributesTooLarge {
                    what,
                    limit: if what == "values" {
                        limits.max_attribute_values
                    } else {
                        limits.max_attribute_bytes
                    },
                });
                Map::new()
            }
        },
        None => Map::new(),
    };
    AccessRequest {
        credential,
        operation,
        http,
        attributes,
        context: Map::new(),
        source: None,
        client_certificate: (!request.client_certificate.is_empty())
            .then_some(ClientCertificate::Der(request.client_certificate)),
        proxy_header_count: None,
        explain: request.explain,
        problem,
        risk_counts: None,
    }
}

/// A name `headers` holds more than once (they are folded to lower case).
fn duplicate_name(headers: &Headers) -> Option<String> {
    let mut names: Vec<&str> = headers.iter().map(|(name, _)| name).collect();
    names.sort_unstable();
    names
        .windows(2)
        .find(|pair| pair[0] == pair[1])
        .map(|pair| pair[0].to_owned())
}

fn outcome(o: Outcome) -> v1::Outcome {
    match o {
        Outcome::Allow => v1::Outcome::Allow,
        Outcome::StepUp => v1::Outcome::StepUp,
        Outcome::Deny => v1::Outcome::Deny,
    }
}

pub fn decide_response(d: &Decision, upstream: &Upstream) -> DecideResponse {
    DecideResponse {
        headers_to_remove: if d.is_allow() {
            upstream
                .headers_to_remove(&d.identity_headers)
                .map(str::to_owned)
                .chain(d.stray_headers.iter().cloned())
                .collect()
        } else {
            Vec::new()
        },
        outcome: outcome(d.outcome) as i32,
        rule: d.rule.as_deref().unwrap_or_default().to_owned(),
        reason: d.reason.as_str().to_owned(),
        message: d.message.to_string(),
        http_status: u32::from(d.http_status),
        www_authenticate: d.www_authenticate.clone().unwrap_or_default(),
        step_up: d.step_up.as_ref().map(|s| v1::StepUpRequirement {
            auth_contexts: s.auth_contexts.clone(),
            missing_auth_contexts: s.missing_auth_contexts.clone(),
            acr_values: s.acr_values.clone(),
            max_age_seconds: s.max_age.unwrap_or_default(),
            amr: s.amr.clone(),
            claims: s.claims.as_ref().map(|c| c.0.clone()).unwrap_or_default(),
            claims_base64: s.claims.as_ref().map(|c| c.1.clone()).unwrap_or_default(),
            challenge_style: s.style.to_owned(),
        }),
        principal: d.principal.as_ref().map(|p| v1::Principal {
            issuer_id: p.issuer_id.to_string(),
            issuer: p.issuer.to_string(),
            subject: p.subject.to_string(),
            tenant: p.tenant.as_deref().unwrap_or_default().to_owned(),
            client_id: p.client_id.as_deref().unwrap_or_default().to_owned(),
            acrs: strings(&p.acrs),
            acr: p.acr.as_deref().unwrap_or_default().to_owned(),
            amr: strings(&p.amr),
            auth_time: p.auth_time.unwrap_or_default(),
            scopes: strings(&p.scopes),
            roles: strings(&p.roles),
            app_only: p.app_only,
            expires_at: p.expires_at,
        }),
        identity_headers: d
            .identity_headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        explain: d
            .explain
            .iter()
            .map(|s| v1::ExplainStep {
                stage: s.stage.to_owned(),
                detail: s.detail.clone(),
            })
            .collect(),
        token_fingerprint: d.token_fingerprint.clone().unwrap_or_default(),
        block: d.block.as_deref().unwrap_or_default().to_owned(),
        shadow: d
            .shadow
            .iter()
            .map(|s| v1::ShadowOutcome {
                rule: s.rule.to_string(),
                escalation: s.escalation.map(|i| i as u32),
                outcome: outcome(s.outcome) as i32,
                reason: s.reason.as_str().to_owned(),
            })
            .collect(),
    }
}

fn strings(values: &[Arc<str>]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(token: &str, authorization: Option<&str>) -> PresentedCredential {
        let request = DecideRequest {
            credential: Some(decide_request::Credential::Token(token.to_owned())),
            operation: "op".to_owned(),
            http: authorization.map(|value| v1::HttpRequest {
                method: "GET".to_owned(),
                path: "/".to_owned(),
                headers: [("Authorization".to_owned(), value.to_owned())].into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        access_request(request, HeaderLimits::DEFAULT).credential
    }

    #[tokio::test]
    async fn a_panic_while_deciding_is_a_500_denial_not_a_grpc_error() {
        use crate::policy::testing::{DEMO_POLICY, compile_policy};
        let policy = Arc::new(compile_policy(DEMO_POLICY));
        let broken = |_: &crate::policy::Policy, _: &AccessRequest, _: i64, _: i64| -> Decision {
            panic!("a bug in the engine")
        };
        let decide = Decide::new(Arc::new(Authorizer::with_engine(policy, broken)));
        let request = Request::new(DecideRequest {
            operation: "payments.wire_transfer".to_owned(),
            ..Default::default()
        });
        let response = DecisionService::decide(&decide, request)
            .await
            .expect("an answer")
            .into_inner();
        assert_eq!(
            (
                response.outcome(),
                response.http_status,
                response.reason.as_str()
            ),
            (v1::Outcome::Deny, 500, "internal_error")
        );
        assert!(response.principal.is_none() && response.identity_headers.is_empty());
    }

    /// A `Decide` reads a request as `Check` does: a method or host left empty is its
    /// pseudo-header's, and with neither the request is refused rather than taken as a GET.
    #[test]
    fn an_empty_method_or_host_is_read_from_its_pseudo_header_or_refused() {
        use crate::policy::testing::{DEMO_POLICY, compile_policy};
        let policy = compile_policy(DEMO_POLICY);
        let decide = |method: &str, host: &str, headers: &[(&str, &str)]| {
            let request = DecideRequest {
                http: Some(v1::HttpRequest {
                    method: method.to_owned(),
                    host: host.to_owned(),
                    path: "/healthz".to_owned(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                }),
                ..Default::default()
            };
            let access = access_request(request, HeaderLimits::DEFAULT);
            let decision = crate::decision::decide(&policy, &access, 1_700_000_000);
            (access, decision)
        };
        let (_, get) = decide("GET", "", &[]);
        assert!(get.is_allow(), "the demo's anonymous health rule: {get:?}");
        let (post, refused) = decide("", "", &[(":method", "POST")]);
        assert_eq!(post.http.as_ref().unwrap().method, "POST");
        assert!(!refused.is_allow(), "{refused:?}");
        let (_, none) = decide("", "", &[]);
        assert_eq!(
            (none.http_status, none.reason),
            (400, crate::decision::Reason::MalformedRequest),
            "{none:?}"
        );
        let (hosted, _) = decide("GET", "", &[(":authority", "Admin.Example.com:8443")]);
        let http = hosted.http.as_ref().unwrap();
        assert_eq!(
            (http.host.as_str(), http.host_as_sent()),
            ("admin.example.com", "admin.example.com:8443")
        );
        // An HTTP/1 server's headers name the host as `host`.
        let (hosted, _) = decide("GET", "", &[("host", "admin.example.com")]);
        assert_eq!(hosted.http.as_ref().unwrap().host, "admin.example.com");
        // A field its pseudo-header contradicts is refused: the upstream may read either.
        for (method, host, headers) in [
            ("GET", "", &[(":method", "POST")][..]),
            ("GET", "", &[(":path", "/admin/users")][..]),
            ("GET", "a.example", &[(":authority", "b.example")][..]),
            ("GET", "a.example", &[("host", "b.example")][..]),
        ] {
            let (_, refused) = decide(method, host, headers);
            assert_eq!(
                (refused.http_status, refused.reason),
                (400, crate::decision::Reason::MalformedRequest),
                "{headers:?}: {refused:?}"
            );
            assert!(refused.message.contains("differ"), "{refused:?}");
        }
        // One host in another letter case, with or without its port or trailing dot.
        for (host, header) in [
            ("A.example", (":authority", "a.EXAMPLE")),
            ("api.example.com", ("host", "api.example.com:8443")),
            ("api.example.com.", ("host", "api.example.com")),
        ] {
            let (_, same) = decide("GET", host, &[header]);
            assert!(same.is_allow(), "{host} {header:?}: {same:?}");
        }
    }

    /// Host rules cannot match a request without a host: it is refused where the policy has
    /// them, and decided as before where it has none.
    #[test]
    fn a_request_without_a_host_is_refused_where_rules_match_hosts() {
        use crate::policy::testing::{DEMO_POLICY, compile_policy};
        let request = DecideRequest {
            http: Some(v1::HttpRequest {
                method: "GET".to_owned(),
                path: "/healthz".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let access = access_request(request, HeaderLimits::DEFAULT);
        let plain = compile_policy(DEMO_POLICY);
        assert!(crate::decision::decide(&plain, &access, 1_700_000_000).is_allow());
        let hosted = DEMO_POLICY.replace(
            "match: { methods: [GET], path: /healthz }",
            "match: { methods: [GET], path: /healthz, hosts: [api.example.com] }",
        );
        assert_ne!(hosted, DEMO_POLICY);
        let hosted = compile_policy(&hosted);
        let refused = crate::decision::decide(&hosted, &access, 1_700_000_000);
        assert_eq!(refused.http_status, 400, "{refused:?}");
        assert!(refused.message.contains("without a host"), "{refused:?}");
        // An x-forwarded-host naming another host: servers that trust it route on it.
        let with_header = |name: &str, value: &str| {
            let request = DecideRequest {
                http: Some(v1::HttpRequest {
                    method: "GET".to_owned(),
                    host: "api.example.com".to_owned(),
                    path: "/healthz".to_owned(),
                    headers: [(name.to_owned(), value.to_owned())].into(),
                }),
                ..Default::default()
            };
            let access = access_request(request, HeaderLimits::DEFAULT);
            (
                crate::decision::decide(&hosted, &access, 1_700_000_000),
                crate::decision::decide(&plain, &access, 1_700_000_000),
            )
        };
        let forwarded = |value: &str| with_header("X-Forwarded-Host", value);
        let (refused, unhosted) = forwarded("admin.example.com");
        assert_eq!(refused.http_status, 400, "{refused:?}");
        assert!(refused.message.contains("x-forwarded-host"), "{refused:?}");
        assert!(
            unhosted.is_allow(),
            "no host rules, nothing to mislead: {unhosted:?}"
        );
        let (same, _) = forwarded("API.example.com:443");
        assert!(same.is_allow(), "{same:?}");
        let (refused, _) = forwarded("[api.example.com]@admin.example.com");
        assert_eq!(refused.http_status, 400, "{refused:?}");
        // The request's own host read as another by a URL parser: refused, host rules or not.
        let to_host = |host: &str| {
            let request = DecideRequest {
                http: Some(v1::HttpRequest {
                    method: "GET".to_owned(),
                    host: host.to_owned(),
                    path: "/healthz".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            access_request(request, HeaderLimits::DEFAULT)
        };
        for host in [
            "[api.example.com]@admin.example.com",
            "alice@admin.example.com",
            "[::1]x",
        ] {
            for policy in [&hosted, &plain] {
                let refused = crate::decision::decide(policy, &to_host(host), 1_700_000_000);
                assert_eq!(refused.http_status, 400, "{host}: {refused:?}");
                assert!(refused.message.contains("user information"), "{refused:?}");
            }
        }
        for host in ["[::1]", "[::1]:8443", "api.example.com:443"] {
            let decided = crate::decision::decide(&plain, &to_host(host), 1_700_000_000);
            assert!(decided.is_allow(), "{host}: {decided:?}");
        }
        // A Forwarded header's host= (RFC 7239): Spring and Quarkus route on it.
        for value in [
            "host=admin.example.com",
            "for=192.0.2.60;proto=https;Host=\"admin.example.com\"",
            "host=api.example.com, host=admin.example.com",
            "for=\"[2001:db8::1]\";host=\"admin.example.com:443\";proto=https",
            "host=\"api.example.com\\\"x\"",
            // Spaces around `=` (Rack), a quoted `,` (Rack 3.1 reads the whole string), `ſ`.
            "for=1.2.3.4; host = admin.example.com",
            "host\t=admin.example.com",
            "host=\"api.example.com,admin.example.com\"",
            "hoſt=admin.example.com",
            "host=\"api.example.com\\,admin\"",
            // A quoted name (Jetty, @angular/ssr drop the quotes), and a bracketed host a URL
            // parser reads as another.
            "for=192.0.2.1, \"host\"=admin.example.com",
            "ho\"st\"=admin.example.com",
            "host=\"\"admin.example.com",
            "host=\"[api.example.com]@admin.example.com\"",
        ] {
            let (refused, unhosted) = with_header("Forwarded", value);
            assert_eq!(refused.http_status, 400, "{value}: {refused:?}");
            assert!(refused.message.contains("Forwarded"), "{refused:?}");
            assert!(unhosted.is_allow(), "{value}: {unhosted:?}");
        }
        for value in [
            "for=192.0.2.60;proto=https",
            "host=API.example.com:443;proto=https",
            "for=a, host=\"api.example.com.\"",
            "host=",
            "host = api.example.com ; proto=https",
        ] {
            let (same, _) = with_header("Forwarded", value);
            assert!(same.is_allow(), "{value}: {same:?}");
        }
        // A host longer than any, however it ends: refused without reading it all.
        for value in [
            format!("host=api.example.com{};", " ".repeat(600)),
            format!("host=\"{}", "a".repeat(600)),
            format!("host={}", "a".repeat(600)),
        ] {
            let (refused, _) = with_header("Forwarded", &value);
            assert_eq!(refused.http_status, 400, "{refused:?}");
        }
        // More host parameters than proxies would write: refused without reading them all.
        let many = vec!["host=api.example.com"; crate::request::MAX_FORWARDED_HOSTS + 1].join(",");
        let (refused, _) = with_header("Forwarded", &many);
        assert_eq!(refused.http_status, 400, "{refused:?}");
        let (same, _) = with_header("Forwarded", &many[..many.rfind(',').unwrap()]);
        assert!(same.is_allow(), "{same:?}");
    }

    #[test]
    fn a_token_field_and_an_authorization_header_must_hold_the_same_token() {
        let two = PresentedCredential::Unusable(CredentialProblem::MultipleCredentials);
        let one = PresentedCredential::Token("abc.def.ghi".to_owned());
        assert_eq!(credential("abc.def.ghi", None), one);
        assert_eq!(credential("abc.def.ghi", Some("Bearer abc.def.ghi")), one);
        assert_eq!(
            credential("abc.def.ghi", Some("  bearer   abc.def.ghi ")),
            one
        );
        assert_eq!(credential("abc.def.ghi", Some("")), one);
        for header in [
            "Bearer xabc.def.ghi",
            "Bearer other abc.def.ghi",
            "Basic abc.def.ghi",
            "abc.def.ghi",
            "Bearer abc.def.ghi,Bearer abc.def.ghi",
        ] {
            assert_eq!(credential("abc.def.ghi", Some(header)), two, "{header}");
        }
        assert_eq!(credential("def.ghi", Some("Bearer abc.def.ghi")), two);
        assert_eq!(credential("", Some("Bearer abc.def.ghi")), two);
    }
}
