//! Table tests of the pure engine: `decide(policy, request, now)` as scenarios.
//!
//! Every test compiles a policy (the bundled demo policy, or a small inline one), installs the demo
//! key set synchronously, mints tokens with the demo private keys at the fixed time [`NOW`] and
//! asserts the outcome, HTTP status, reason code and (where the protocol fixes it) the exact
//! `WWW-Authenticate` value.

use std::sync::Arc;

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::{Decision, Outcome, Reason, decide};
use crate::{
    demo::{
        self, DEMO_AUDIENCE, DEMO_EC_KID, DEMO_ENTRA_ISSUER, DEMO_OIDC_ISSUER, DEMO_RSA_KID,
        TokenSpec,
    },
    identity::{ClientCertificate, CredentialProblem, KeepClaims, thumbprint},
    policy::{
        Policy,
        testing::{DEMO_POLICY, compile_policy, demo_file},
    },
    request::{AccessRequest, Headers, HttpAttributes, PresentedCredential, RequestProblem},
};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The one clock of every test.
const NOW: i64 = 1_800_000_000;
/// An empty credential: `decide_op`/`decide_http` then present no token at all.
const NO_TOKEN: &str = "";
const REALM_ONLY: &str = "Bearer realm=\"stepgate-demo\"";
const ENTRA_AUTHORIZE: &str = "https://login.microsoftonline.com/common/oauth2/authorize";
/// base64 of `{"access_token":{"acrs":{"essential":true,"value":"c1"}}}` (Microsoft's own example).
const C1_CLAIMS_B64: &str =
    "eyJhY2Nlc3NfdG9rZW4iOnsiYWNycyI6eyJlc3NlbnRpYWwiOnRydWUsInZhbHVlIjoiYzEifX19";

fn demo_policy() -> Policy {
    compile_policy(DEMO_POLICY)
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

/// A delegated Entra user token from a client that declared `cp1`, signed in just now.
fn entra_user(acrs: &[&str]) -> TokenSpec {
    TokenSpec {
        acrs: strings(acrs),
        xms_cc: strings(&["cp1"]),
        auth_age: Some(60),
        ..TokenSpec::default()
    }
}

/// An RFC 9470 (OIDC) admin token that meets every requirement of the demo `admin` rule.
fn oidc_admin() -> TokenSpec {
    TokenSpec {
        issuer: DEMO_OIDC_ISSUER.to_owned(),
        subject: "bob".to_owned(),
        tenant: None,
        acr: Some("urn:okta:loa:2fa:any".to_owned()),
        amr: strings(&["pwd", "mfa"]),
        auth_age: Some(120),
        roles: strings(&["Admin"]),
        ..TokenSpec::default()
    }
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&demo_file("demo-rsa-private.pem")).expect("demo RSA key")
}

fn sign_claims(claims: &Value) -> String {
    demo::sign(
        claims,
        &demo_file("demo-rsa-private.pem"),
        Algorithm::RS256,
        DEMO_RSA_KID,
    )
    .expect("RS256 signs")
}

/// RS256 with the demo RSA key, claims as of `NOW`.
fn rs256(spec: &TokenSpec) -> String {
    sign_claims(&spec.claims(NOW))
}

/// ES256 with the demo P-256 key, claims as of `NOW`.
fn es256(spec: &TokenSpec) -> String {
    demo::sign(
        &spec.claims(NOW),
        &demo_file("demo-ec-private.pem"),
        Algorithm::ES256,
        DEMO_EC_KID,
    )
    .expect("ES256 signs")
}

/// Claims of `spec` at `NOW` with `changes` merged over them (a `null` removes a claim).
fn claims_with(spec: &TokenSpec, changes: Value) -> Value {
    let mut claims = spec.claims(NOW);
    let map = claims.as_object_mut().unwrap();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            map.remove(k);
        } else {
            map.insert(k.clone(), v.clone());
        }
    }
    claims
}

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A compact JWS with exactly this header, signed properly with `key` under `alg`.
fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64_json(header), b64_json(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).expect("signs");
    format!("{message}.{signature}")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn op_request(token: &str, operation: &str, attributes: Value) -> AccessRequest {
    AccessRequest {
        credential: if token.is_empty() {
            PresentedCredential::None
        } else {
            PresentedCredential::Token(token.to_owned())
        },
        operation: Some(operation.to_owned()),
        attributes: attributes.as_object().cloned().unwrap_or_default(),
        ..AccessRequest::default()
    }
}

fn http_request(authorization: &str, method: &str, target: &str) -> AccessRequest {
    AccessRequest {
        credential: if authorization.is_empty() {
            PresentedCredential::None
        } else {
            PresentedCredential::Authorization(authorization.to_owned())
        },
        http: Some(HttpAttributes::new(
            method,
            "api.example.com:443",
            target,
            Headers::default(),
        )),
        ..AccessRequest::default()
    }
}

/// A `Decide` call against the demo policy.
fn decide_op(token: &str, operation: &str, attributes: Value) -> Decision {
    decide(
        &demo_policy(),
        &op_request(token, operation, attributes),
        NOW,
    )
}

/// An Envoy check against the demo policy; `authorization` is the raw header value ("" = none).
fn decide_http(authorization: &str, method: &str, target: &str) -> Decision {
    decide(
        &demo_policy(),
        &http_request(authorization, method, target),
        NOW,
    )
}

/// A `Decide` call on any operation the demo policy's catch-all rule accepts: only the token counts.
fn decide_token(token: &str) -> Decision {
    decide_op(token, "inventory.list", json!({}))
}

#[track_caller]
fn expect(d: &Decision, outcome: Outcome, status: u16, reason: Reason) {
    assert_eq!(
        (d.outcome, d.http_status, d.reason.as_str()),
        (outcome, status, reason.as_str()),
        "unexpected decision: {d:#?}"
    );
}

#[track_caller]
fn www(d: &Decision) -> &str {
    d.www_authenticate
        .as_deref()
        .unwrap_or_else(|| panic!("no WWW-Authenticate: {d:#?}"))
}

fn rule(d: &Decision) -> Option<&str> {
    d.rule.as_deref()
}

fn header<'d>(d: &'d Decision, name: &str) -> Option<&'d str> {
    d.identity_headers
        .iter()
        .find(|(n, _)| &**n == name)
        .map(|(_, v)| &**v)
}

/// The decoded `claims="…"` parameter of an Entra claims challenge.
#[track_caller]
fn challenge_claims(www: &str) -> Value {
    let start = www.find("claims=\"").expect("a claims parameter") + "claims=\"".len();
    let b64 = &www[start..start + www[start..].find('"').expect("closing quote")];
    serde_json::from_slice(&STANDARD.decode(b64).expect("standard base64"))
        .expect("JSON claims request")
}

fn entra_challenge_for(context: &str) -> Value {
    json!({"access_token": {"acrs": {"essential": true, "value": context}}})
}

/// Two issuers with the styles the demo policy lacks, plus rules for claim equality, `when`,
/// roles, a freshness-only requirement and a matcher condition reading claims.
const INLINE_POLICY: &str = r#"
realm: inline
issuers:
  - id: entra
    issuer: https://login.demo.stepgate.invalid/entra/v2.0
    jwks_file: demo-keys/jwks.json
    audiences: [api://stepgate-demo]
    algorithms: [RS256, ES256]
    challenge: entra
  - id: locked
    issuer: https://login.demo.stepgate.invalid/oidc
    jwks_file: demo-keys/jwks.json
    audiences: [api://stepgate-demo]
    challenge: deny
auth_contexts:
  c1: { description: MFA }
rules:
  - id: stepped
    match: { operation: stepped }
    require: { auth_contexts: [c1], max_age: 15m }
  - id: fresh-only
    match: { operation: fresh }
    require: { max_age: 5m }
  - id: tenant-bound
    match: { operation: tenant }
    require: { claims: { tid: [contoso, fabrikam], groups: finance } }
  - id: conditional
    match: { operation: conditional }
    require: { when: 'claims.department == "finance"' }
  - id: staff-only
    match: { operation: staff }
    require: { roles: [Staff] }
  - id: contoso-reports
    match: { operation: reports, when: 'claims.tid == "contoso"' }
default: deny
"#;

const ALLOW_AUTHENTICATED_POLICY: &str = r#"
issuers:
  - id: oidc
    issuer: https://login.demo.stepgate.invalid/oidc
    jwks_file: demo-keys/jwks.json
    audiences: [api://stepgate-demo]
rules:
  - id: reports
    match: { path: "/reports/**" }
    require: { scopes: [reports.read] }
default: allow_authenticated
"#;

fn decide_inline(token: &str, operation: &str) -> Decision {
    decide(
        &compile_policy(INLINE_POLICY),
        &op_request(token, operation, json!({})),
        NOW,
    )
}

// ---------------------------------------------------------------------------------------------
// Fixture sanity
// ---------------------------------------------------------------------------------------------

#[test]
fn demo_policy_has_one_issuer_per_challenge_style_with_keys_installed() {
    let policy = demo_policy();
    let styles: Vec<_> = policy
        .issuers
        .iter()
        .map(|i| (&*i.id, i.challenge.as_str()))
        .collect();
    assert_eq!(
        styles,
        vec![("demo-entra", "entra"), ("demo-oidc", "rfc9470")]
    );
    for issuer in policy.issuers.iter() {
        let mut kids: Vec<_> = issuer.keys().kids().map(str::to_owned).collect();
        kids.sort();
        assert_eq!(kids, vec![DEMO_EC_KID.to_owned(), DEMO_RSA_KID.to_owned()]);
    }
}

// ---------------------------------------------------------------------------------------------
// No token
// ---------------------------------------------------------------------------------------------

#[test]
fn no_token_is_401_with_a_bare_realm_and_nothing_about_the_rule() {
    let cases = [
        (
            "Decide wire transfer (Entra-style rule)",
            decide_op(NO_TOKEN, "payments.wire_transfer", json!({})),
        ),
        (
            "Decide admin (RFC 9470-only rule)",
            decide_op(NO_TOKEN, "admin.users.delete", json!({})),
        ),
        (
            "Envoy POST /payments/wire",
            decide_http(NO_TOKEN, "POST", "/payments/wire"),
        ),
        (
            "Envoy GET /admin/users",
            decide_http(NO_TOKEN, "GET", "/admin/users"),
        ),
        (
            "Envoy GET /customers/1/pii",
            decide_http(NO_TOKEN, "GET", "/customers/1/pii"),
        ),
        (
            "empty Authorization header",
            decide_http("   ", "POST", "/payments/wire"),
        ),
    ];
    for (case, d) in cases {
        assert_eq!(d.outcome, Outcome::Deny, "{case}");
        assert_eq!(d.http_status, 401, "{case}");
        assert_eq!(d.reason, Reason::TokenMissing, "{case}");
        assert_eq!(d.www_authenticate.as_deref(), Some(REALM_ONLY), "{case}");
        assert_eq!(rule(&d), None, "{case}: the rule must not be revealed");
        assert!(d.step_up.is_none() && d.principal.is_none(), "{case}");
        assert!(d.token_fingerprint.is_none(), "{case}");
        assert!(d.identity_headers.is_empty(), "{case}");
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed requests
// ---------------------------------------------------------------------------------------------

#[test]
fn an_operation_is_decided_up_to_256_bytes_without_control_characters() {
    let token = rs256(&entra_user(&["c1"]));
    // The catch-all rule takes any operation the policy does not name.
    let longest = format!("inventory.{}", "x".repeat(256 - "inventory.".len()));
    expect(
        &decide_op(&token, &longest, json!({})),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    for refused in [
        format!("{longest}x"),
        "inventory\u{7f}.list".to_owned(),
        "inventory.list\n".to_owned(),
    ] {
        let d = decide_op(&token, &refused, json!({}));
        expect(&d, Outcome::Deny, 400, Reason::MalformedRequest);
        assert!(d.message.contains("256 bytes"), "{d:?}");
        // Refused before the token is read: not even an anonymous request gets further.
        expect(
            &decide_op("", &refused, json!({})),
            Outcome::Deny,
            400,
            Reason::MalformedRequest,
        );
    }
    // Envoy's operation (`context_extensions`) is held to the same bound.
    let mut check = http_request(&bearer(&token), "GET", "/reports");
    check.operation = Some(format!("{longest}x"));
    expect(
        &decide(&demo_policy(), &check, NOW),
        Outcome::Deny,
        400,
        Reason::MalformedRequest,
    );
    // A problem found while reading the request comes first.
    let mut both = op_request(&token, &format!("{longest}x"), json!({}));
    both.problem = Some(RequestProblem::TooManyHeaders {
        count: 200,
        limit: 128,
    });
    expect(
        &decide(&demo_policy(), &both, NOW),
        Outcome::Deny,
        431,
        Reason::TooManyHeaders,
    );
}

#[test]
fn malformed_credentials_are_400_invalid_request() {
    let a = rs256(&entra_user(&["c1"]));
    let b = rs256(&oidc_admin());
    let cases = [
        (
            "two bearer tokens joined by Envoy",
            http_request(&format!("Bearer {a},Bearer {b}"), "POST", "/payments/wire"),
            Reason::MultipleCredentials,
        ),
        (
            "Basic scheme",
            http_request("Basic dXNlcjpwYXNz", "POST", "/payments/wire"),
            Reason::MalformedAuthorization,
        ),
        (
            "Bearer with two words",
            http_request(&format!("Bearer {a} {b}"), "POST", "/payments/wire"),
            Reason::MalformedAuthorization,
        ),
        (
            "header token plus access_token query parameter",
            http_request(
                &bearer(&a),
                "POST",
                &format!("/payments/wire?access_token={b}"),
            ),
            Reason::MultipleCredentials,
        ),
        (
            "header token plus access_token after a ';' separator",
            http_request(
                &bearer(&a),
                "POST",
                &format!("/payments/wire?dry_run=1;access_token={b}"),
            ),
            Reason::MultipleCredentials,
        ),
        (
            "an access_token query parameter alone",
            http_request("", "POST", &format!("/payments/wire?access_token={b}")),
            Reason::MalformedAuthorization,
        ),
        (
            "an access_token query parameter alone, on a route open to anonymous callers",
            http_request("", "GET", "/healthz?access_token=garbage"),
            Reason::MalformedAuthorization,
        ),
        (
            "credential refused by the adapter",
            AccessRequest {
                credential: PresentedCredential::Unusable(CredentialProblem::MultipleCredentials),
                operation: Some("payments.wire_transfer".into()),
                ..AccessRequest::default()
            },
            Reason::MultipleCredentials,
        ),
    ];
    let policy = demo_policy();
    for (case, request, reason) in cases {
        let d = decide(&policy, &request, NOW);
        assert_eq!(
            (d.outcome, d.http_status, d.reason),
            (Outcome::Deny, 400, reason),
            "{case}: {d:#?}"
        );
        assert!(
            www(&d).starts_with(
                "Bearer realm=\"stepgate-demo\", error=\"invalid_request\", error_description=\""
            ),
            "{case}: {}",
            www(&d)
        );
        assert_eq!(rule(&d), None, "{case}");
        assert!(
            d.principal.is_none(),
            "{case}: a malformed request is refused before any token is read"
        );
    }
}

#[test]
fn basic_scheme_gets_the_exact_invalid_request_challenge() {
    let d = decide_http("Basic dXNlcjpwYXNz", "GET", "/admin/users");
    expect(&d, Outcome::Deny, 400, Reason::MalformedAuthorization);
    assert_eq!(
        www(&d),
        "Bearer realm=\"stepgate-demo\", error=\"invalid_request\", \
         error_description=\"the Authorization header does not use the Bearer scheme\""
    );
}

// ---------------------------------------------------------------------------------------------
// Invalid token (both issuers)
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_token_is_401_invalid_token_for_either_issuer() {
    for spec in [entra_user(&["c1"]), oidc_admin()] {
        let expired = rs256(&TokenSpec {
            lifetime: -3600,
            ..spec.clone()
        });
        for d in [
            decide_op(&expired, "payments.wire_transfer", json!({})),
            decide_http(&bearer(&expired), "GET", "/admin/users"),
        ] {
            expect(&d, Outcome::Deny, 401, Reason::TokenExpired);
            assert_eq!(
                www(&d),
                "Bearer realm=\"stepgate-demo\", error=\"invalid_token\", error_description=\"the access token expired\""
            );
            assert!(d.step_up.is_none() && d.principal.is_none());
            assert_eq!(
                rule(&d),
                None,
                "an invalid token is refused before any rule is matched"
            );
            assert_eq!(d.token_fingerprint.as_deref().map(str::len), Some(12));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Authorization: scopes, roles, claims, `when` → 403
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_scope_is_403_insufficient_scope_naming_the_scope_for_either_issuer() {
    for spec in [entra_user(&["c3"]), oidc_admin()] {
        let token = rs256(&spec);
        for d in [
            decide_http(&bearer(&token), "GET", "/customers/42/pii"),
            decide_op(&token, "customers.read_pii", json!({})),
        ] {
            expect(&d, Outcome::Deny, 403, Reason::MissingScope);
            assert_eq!(
                www(&d),
                "Bearer realm=\"stepgate-demo\", error=\"insufficient_scope\", \
                 error_description=\"missing scope customers.read\", scope=\"customers.read\""
            );
            assert_eq!(rule(&d), Some("customer-pii"));
            assert!(d.principal.is_some());
        }
    }
}

/// `roles`, `amr`, `acrs` and `xms_cc` are arrays, or one string that is one value: only the
/// scope claims are space-separated lists. One role named `Order Admin` (Keycloak and Auth0 allow
/// spaces; a mapper that is not multivalued writes a string) is not the role `Admin`.
#[test]
fn a_string_claim_is_one_value_and_only_scopes_are_split_on_spaces() {
    let with = |changes: Value| sign_claims(&claims_with(&oidc_admin(), changes));
    let d = decide_inline(&with(json!({"roles": "Order Staff"})), "staff");
    expect(&d, Outcome::Deny, 403, Reason::MissingRole);
    let d = decide_inline(&with(json!({"roles": "Staff"})), "staff");
    assert_eq!(d.outcome, Outcome::Allow, "{d:#?}");
    let d = decide_inline(&with(json!({"roles": ["Order Staff"]})), "staff");
    expect(&d, Outcome::Deny, 403, Reason::MissingRole);

    // The demo's admin rule: `amr: [mfa]` is not met by one method named "pwd mfa".
    let d = decide_http(
        &bearer(&with(json!({"amr": "pwd mfa"}))),
        "DELETE",
        "/admin/users/7",
    );
    assert_ne!(d.outcome, Outcome::Allow, "{d:#?}");
    assert_eq!(rule(&d), Some("admin"));

    // A role with a space is one the policy can name.
    let policy = with_rules(
        "  - id: order-admin\n    match: { operation: orders.admin }\n    require: { roles: [\"Order Admin\"] }\n",
    );
    let d = decide(
        &policy,
        &op_request(
            &with(json!({"roles": "Order Admin"})),
            "orders.admin",
            json!({}),
        ),
        NOW,
    );
    assert_eq!(d.outcome, Outcome::Allow, "{d:#?}");

    // And one the upstream cannot read as two: a list header's items have their spaces (and
    // percent signs) percent-encoded.
    let policy = compile_policy(&DEMO_POLICY.replacen(
        "    x-stepgate-rule: rule\n",
        "    x-stepgate-rule: rule\n    x-stepgate-roles: roles\n    x-groups: claim:groups\n",
        1,
    ));
    let header_of = |claims: Value, name: &str| {
        let d = decide(
            &policy,
            &http_request(&bearer(&with(claims)), "GET", "/api/x"),
            NOW,
        );
        assert_eq!(d.outcome, Outcome::Allow, "{d:#?}");
        header(&d, name).map(str::to_owned)
    };
    assert_eq!(
        header_of(json!({"roles": "Order Admin"}), "x-stepgate-roles").as_deref(),
        Some("Order%20Admin")
    );
    assert_eq!(
        header_of(json!({"roles": ["Order", "Admin"]}), "x-stepgate-roles").as_deref(),
        Some("Order Admin")
    );
    assert_eq!(
        header_of(
            json!({"roles": ["Order Admin", "100%"]}),
            "x-stepgate-roles"
        )
        .as_deref(),
        Some("Order%20Admin 100%25")
    );
    assert_eq!(
        header_of(json!({"groups": ["finance team", "ops"]}), "x-groups").as_deref(),
        Some("finance%20team ops")
    );

    // Scopes stay a space-separated list.
    let spec = TokenSpec {
        scopes: strings(&[]),
        ..entra_user(&["c3"])
    };
    let token = sign_claims(&claims_with(
        &spec,
        json!({"scp": "orders.read customers.read"}),
    ));
    let d = decide_op(&token, "customers.read_pii", json!({}));
    assert_ne!(d.reason, Reason::MissingScope, "{d:#?}");
}

/// Scopes and `acr` values are written into challenges: a control character, a quote, a space
/// or a letter outside ASCII in one would break the header (or let the policy write another
/// parameter), so the policy is refused, naming the field.
#[test]
fn requirement_values_written_into_challenges_are_printable_ascii() {
    for (field, value) in [
        ("scopes", "payments\\u0001write"),
        ("acr", "niveau\\u007f"),
        ("acr", "niveau-élevé"),
        ("amr", "m fa"),
        ("scopes", "a\\\"b"),
    ] {
        let text = DEMO_POLICY.replace(
            "  - id: everything-else\n",
            &format!(
                "  - id: odd\n    match: {{ operation: odd }}\n    require: {{ {field}: [\"{value}\"] }}\n  - id: everything-else\n"
            ),
        );
        let file = crate::config::parse(&text).unwrap_or_else(|e| panic!("{value}: {e}"));
        let error = crate::policy::compile(&file, std::path::Path::new("examples"))
            .expect_err(value)
            .to_string();
        assert!(error.contains(&format!("require.{field}[0]")), "{error}");
    }
}

#[test]
fn scope_present_moves_on_to_the_auth_context_check() {
    let spec = TokenSpec {
        scopes: strings(&["user_impersonation", "customers.read"]),
        ..entra_user(&["c3"])
    };
    expect(
        &decide_op(&rs256(&spec), "customers.read_pii", json!({})),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    let spec = TokenSpec {
        acrs: strings(&["c1"]),
        ..spec
    };
    let d = decide_op(&rs256(&spec), "customers.read_pii", json!({}));
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    assert_eq!(challenge_claims(www(&d)), entra_challenge_for("c3"));
}

#[test]
fn a_get_rule_covers_head_and_a_method_or_path_override_is_refused() {
    // Reading personal data needs c3; this token has the scope but not c3.
    let token = bearer(&rs256(&TokenSpec {
        scopes: strings(&["customers.read"]),
        ..entra_user(&["c1"])
    }));
    // Servers answer HEAD with their GET handlers: the GET rule decides it.
    for method in ["GET", "HEAD"] {
        let d = decide_http(&token, method, "/customers/42/pii");
        expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
        assert_eq!(rule(&d), Some("customer-pii"), "{method}");
    }
    // The method is case-sensitive: `get` is another method to Go, nginx and Envoy's routes, and
    // GET to servers that upper-case it. Refused, even on an anonymous route.
    for (token, method, path) in [
        (token.as_str(), "head", "/customers/42/pii"),
        ("", "get", "/healthz"),
        ("", "Get", "/healthz"),
    ] {
        let d = decide_http(token, method, path);
        expect(&d, Outcome::Deny, 400, Reason::MalformedRequest);
        assert!(d.message.contains("lower-case"), "{}", d.message);
    }
    // A POST some servers would serve as a GET (or on another path) is refused before any rule.
    let with_header = |name: &str, value: &str| {
        let mut request = http_request(&token, "POST", "/customers/42/pii");
        let http = request.http.as_mut().unwrap();
        http.headers.insert(name, value);
        request
    };
    for (name, value) in [
        ("x-http-method-override", "GET"),
        ("x-http-method", "GET"),
        ("x-method-override", "get"),
        ("x-original-url", "/customers/42/pii"),
        ("x-rewrite-url", "/customers/42/pii"),
        // CGI-style runtimes read `_` in a header name as `-`.
        ("x_http_method_override", "GET"),
        ("X_Original_URL", "/customers/42/pii"),
    ] {
        let d = decide(&demo_policy(), &with_header(name, value), NOW);
        expect(&d, Outcome::Deny, 400, Reason::MalformedRequest);
        assert!(
            d.message
                .contains(&name.to_ascii_lowercase().replace('_', "-")),
            "{name}: {}",
            d.message
        );
        assert!(www(&d).contains("invalid_request"), "{name}");
    }
    for target in [
        "/customers/42/pii?_method=GET",
        "/customers/42/pii?a=1;_method=GET",
        "/customers/42/pii?%5Fmethod=GET",
        // As PHP reads parameter names.
        "/customers/42/pii?.method=GET",
        "/customers/42/pii?+_method=GET",
        "/customers/42/pii?%20_method=GET",
        "/customers/42/pii?_Method=GET",
        "/customers/42/pii?_method%00x=GET",
        "/customers/42/pii?_method%00%zz=GET",
        "/customers/42/pii?[method=GET",
    ] {
        let d = decide_http(&token, "POST", target);
        expect(&d, Outcome::Deny, 400, Reason::MalformedRequest);
        assert!(d.message.contains("_method"), "{target}: {}", d.message);
    }
    // Parameters that merely contain the name are ordinary.
    let d = decide_http(&token, "POST", "/customers/42/pii?x_method=GET&_methods=1");
    assert_ne!(d.reason, Reason::MalformedRequest, "{}", d.message);
}

/// An identity header stepgate sets, sent by the client with `_` for `-`: Envoy forwards it and
/// removes only the spelling stepgate names, and CGI-style runtimes read both as
/// `HTTP_X_STEPGATE_SUBJECT`. Refused before anything else, even on an anonymous route.
#[test]
fn an_identity_header_spelled_with_underscores_is_refused() {
    let token = bearer(&rs256(&entra_user(&["c1"])));
    for (authorization, target) in [(token.as_str(), "/accounts/42"), ("", "/healthz")] {
        for name in [
            "x_stepgate_subject",
            "X_STEPGATE_TENANT",
            "x-stepgate_rule",
            "x_stepgate-auth-contexts",
        ] {
            let mut request = http_request(authorization, "GET", target);
            request.http.as_mut().unwrap().headers.insert(name, "alice");
            let d = decide(&demo_policy(), &request, NOW);
            expect(&d, Outcome::Deny, 400, Reason::MalformedRequest);
            assert!(
                d.message.contains("spelling an identity header") && !d.message.contains(name),
                "{name}: {}",
                d.message
            );
            assert!(www(&d).contains("invalid_request"), "{name}");
        }
        // The exact spelling is stepgate's to overwrite or remove, and other names with
        // underscores are the upstream's business.
        for name in ["x-stepgate-subject", "x_stepgate_subjects", "x_request_id"] {
            let mut request = http_request(authorization, "GET", target);
            let http = request.http.as_mut().unwrap();
            http.headers.insert(name, "alice");
            let d = decide(&demo_policy(), &request, NOW);
            assert_eq!(
                d.outcome,
                Outcome::Allow,
                "{name} on {target}: {}",
                d.message
            );
        }
    }
}

/// A header spelled like stepgate's own that the policy does not name (an identity header an
/// operator left out, `x-stepgate-roles` the upstream was told of) is removed from an allowed
/// request, as the unset identity headers are: no client's reaches the upstream as stepgate's.
#[test]
fn headers_named_like_stepgates_that_the_policy_does_not_set_are_removed() {
    let token = bearer(&rs256(&entra_user(&["c1"])));
    let policy = demo_policy();
    for (authorization, target) in [(token.as_str(), "/accounts/42"), ("", "/healthz")] {
        let mut request = http_request(authorization, "GET", target);
        let headers = &mut request.http.as_mut().unwrap().headers;
        for name in [
            "x-stepgate-roles",
            "x_stepgate_roles",
            "x-stepgate-subject",
            "x_stepgate_subjects",
            "x-stepgate-",
            "x-request-id",
        ] {
            headers.insert(name, "forged");
        }
        let d = decide(&policy, &request, NOW);
        assert!(d.is_allow(), "{target}: {d:?}");
        assert_eq!(
            d.stray_headers,
            [
                "x-stepgate-roles",
                "x_stepgate_roles",
                "x_stepgate_subjects"
            ],
            "{target}"
        );
        let answer = crate::server::decide::decide_response(&d, &policy.upstream);
        for name in &d.stray_headers {
            assert!(answer.headers_to_remove.contains(name), "{name}");
        }
        // The subject header is the policy's own: set (a token) or removed (anonymous) already.
        assert!(!d.stray_headers.iter().any(|n| n == "x-stepgate-subject"));
    }
    // A refusal forwards nothing, and removes nothing.
    let mut request = http_request("", "GET", "/accounts/42");
    request
        .http
        .as_mut()
        .unwrap()
        .headers
        .insert("x-stepgate-roles", "forged");
    let d = decide(&policy, &request, NOW);
    assert!(!d.is_allow());
    assert!(d.stray_headers.is_empty());
}

/// The demo policy with `rules` (YAML, indented as rules are) before its catch-all rule.
fn with_rules(rules: &str) -> Policy {
    compile_policy(&DEMO_POLICY.replace(
        "  - id: everything-else\n",
        &format!("{rules}  - id: everything-else\n"),
    ))
}

/// With a rule `id` on `path` that asks auth context c1 when `when` holds.
fn with_escalating_rule(id: &str, path: &str, when: &str) -> Policy {
    with_rules(&format!(
        "  - id: {id}\n    match: {{ path: \"{path}\" }}\n    require: {{ authenticated: true }}\n    \
         escalate:\n      - when: '{when}'\n        require: {{ auth_contexts: [c1] }}\n"
    ))
}

/// An RFC 9470 challenge asks with `acr_values` and `max_age` only: a requirement of `amr` alone
/// would challenge with nothing to ask for, and the client's sign-in session would hand back the
/// same token. With `max_age` beside it, the challenge asks for a fresh sign-in.
#[test]
fn an_rfc9470_requirement_of_amr_alone_is_refused_not_challenged() {
    let policy = with_rules(
        "  - id: mfa-only\n    match: { operation: mfa }\n    issuers: [demo-oidc]\n    require: { amr: [mfa] }\n  \
         - id: mfa-fresh\n    match: { operation: mfa-fresh }\n    issuers: [demo-oidc]\n    require: { amr: [mfa], max_age: 15m }\n",
    );
    let password_only = rs256(&TokenSpec {
        amr: strings(&["pwd"]),
        ..oidc_admin()
    });
    let d = decide(&policy, &op_request(&password_only, "mfa", json!({})), NOW);
    expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
    assert!(d.www_authenticate.is_none(), "{d:#?}");
    assert_eq!(d.step_up.as_ref().unwrap().amr, strings(&["mfa"]));
    // A fresh sign-in already meets `max_age`: asking with it again brings the same token.
    let d = decide(
        &policy,
        &op_request(&password_only, "mfa-fresh", json!({})),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
    // An old one does not: the challenge asks for a new sign-in, which may bring the method.
    let old = rs256(&TokenSpec {
        amr: strings(&["pwd"]),
        auth_age: Some(3600),
        ..oidc_admin()
    });
    let d = decide(&policy, &op_request(&old, "mfa-fresh", json!({})), NOW);
    expect(&d, Outcome::StepUp, 401, Reason::MissingAmr);
    assert!(www(&d).ends_with("max_age=900"), "{}", www(&d));
    // Nor is a level the token already has something to ask for.
    let policy = with_rules(
        "  - id: hwk\n    match: { operation: hwk }\n    issuers: [demo-oidc]\n    require: { acr: [\"urn:okta:loa:2fa:any\"], amr: [hwk] }\n",
    );
    let d = decide(
        &policy,
        &op_request(&rs256(&oidc_admin()), "hwk", json!({})),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
}

#[test]
fn cel_reads_the_path_in_its_own_case_and_in_lower_case_on_the_side_of_caution() {
    // An escalation applies if it holds for either spelling: `/EXPORT` is `/export` to ASP.NET.
    let policy = with_escalating_rule(
        "reports",
        "/reports/**",
        r#"request.path.endsWith("/export")"#,
    );
    let token = bearer(&rs256(&entra_user(&[])));
    for target in [
        "/reports/q1/export",
        "/reports/q1/EXPORT",
        "/reports/Q1/Export?x=1",
    ] {
        let d = decide(&policy, &http_request(&token, "GET", target), NOW);
        expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
        assert_eq!(rule(&d), Some("reports"), "{target}");
    }
    let d = decide(&policy, &http_request(&token, "GET", "/reports/q1"), NOW);
    expect(&d, Outcome::Allow, 200, Reason::Allowed);

    // A requirement's condition grants, so it must hold for both: `/users/ALICE` is another
    // user to a server that reads case, and alice's own to one that does not.
    let owner = |when: &str| {
        with_rules(&format!(
            "  - id: own\n    match: {{ path: \"/users/**\" }}\n    require: {{ when: '{when}' }}\n"
        ))
    };
    let exact = owner(r#"request.path.startsWith("/users/" + claims.sub + "/")"#);
    let folded = owner(
        r#"request.path.lowerAscii().startsWith(("/users/" + claims.sub + "/").lowerAscii())"#,
    );
    let user = |sub: &str| {
        bearer(&rs256(&TokenSpec {
            subject: sub.to_owned(),
            ..entra_user(&[])
        }))
    };
    let at = |policy: &Policy, sub: &str, target: &str| {
        decide(policy, &http_request(&user(sub), "GET", target), NOW)
    };
    expect(
        &at(&exact, "alice", "/users/alice/cards"),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    for (sub, target) in [
        ("alice", "/users/ALICE/cards"),
        ("Alice", "/users/Alice/cards"),
    ] {
        expect(
            &at(&exact, sub, target),
            Outcome::Deny,
            403,
            Reason::ConditionFailed,
        );
    }
    // Compared in one case, it holds for both readings.
    expect(
        &at(&folded, "Alice", "/users/Alice/cards"),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    expect(
        &at(&folded, "bob", "/users/Alice/cards"),
        Outcome::Deny,
        403,
        Reason::ConditionFailed,
    );

    // A matcher's condition picks the rule: readings that disagree are refused, not decided on
    // whichever rule one of them picks.
    let picked = with_rules(
        "  - id: exports\n    match: { path: \"/reports/**\", when: 'request.path.endsWith(\"/export\")' }\n    \
         require: { auth_contexts: [c1] }\n",
    );
    let d = decide(
        &picked,
        &http_request(&token, "GET", "/reports/q1/export"),
        NOW,
    );
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    let d = decide(
        &picked,
        &http_request(&token, "GET", "/reports/q1/EXPORT"),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::ConditionError);
    assert!(d.message.contains("reading"), "{}", d.message);
}

#[test]
fn cel_reads_a_head_as_itself_and_as_a_get() {
    let policy = with_escalating_rule("reads", "/statements/**", r#"request.method == "GET""#);
    let token = bearer(&rs256(&entra_user(&[])));
    for method in ["GET", "HEAD"] {
        let d = decide(&policy, &http_request(&token, method, "/statements/7"), NOW);
        expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    }
    let d = decide(&policy, &http_request(&token, "POST", "/statements/7"), NOW);
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
}

#[test]
fn missing_role_is_403_missing_role_for_either_issuer() {
    let oidc = rs256(&TokenSpec {
        roles: strings(&["Reader"]),
        ..oidc_admin()
    });
    let d = decide_http(&bearer(&oidc), "DELETE", "/admin/users/7");
    expect(&d, Outcome::Deny, 403, Reason::MissingRole);
    assert_eq!(rule(&d), Some("admin"));
    assert_eq!(
        www(&d),
        "Bearer realm=\"stepgate-demo\", error=\"insufficient_scope\", error_description=\"missing role Admin\""
    );

    let entra = rs256(&entra_user(&["c1"]));
    let d = decide_inline(&entra, "staff");
    expect(&d, Outcome::Deny, 403, Reason::MissingRole);
    assert!(
        www(&d).contains("error=\"insufficient_scope\""),
        "{}",
        www(&d)
    );
    let staff = rs256(&TokenSpec {
        roles: strings(&["Staff"]),
        ..entra_user(&[])
    });
    expect(
        &decide_inline(&staff, "staff"),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
}

#[test]
fn claim_equality_requirements_accept_any_listed_value_or_array_membership() {
    let with = |tid: &str, groups: Value| {
        let mut spec = entra_user(&[]);
        spec.tenant = Some(tid.to_owned());
        spec.extra.insert("groups".into(), groups);
        rs256(&spec)
    };
    let cases = [
        (
            "listed tenant, scalar group",
            with("contoso", json!("finance")),
            Outcome::Allow,
            Reason::Allowed,
        ),
        (
            "other listed tenant, group in array",
            with("fabrikam", json!(["hr", "finance"])),
            Outcome::Allow,
            Reason::Allowed,
        ),
        (
            "unlisted tenant",
            with("northwind", json!("finance")),
            Outcome::Deny,
            Reason::ClaimMismatch,
        ),
        (
            "group array without the value",
            with("contoso", json!(["hr"])),
            Outcome::Deny,
            Reason::ClaimMismatch,
        ),
        (
            "group of another JSON type",
            with("contoso", json!(7)),
            Outcome::Deny,
            Reason::ClaimMismatch,
        ),
    ];
    for (case, token, outcome, reason) in cases {
        let d = decide_inline(&token, "tenant");
        assert_eq!((d.outcome, d.reason), (outcome, reason), "{case}: {d:#?}");
        if outcome == Outcome::Deny {
            assert_eq!(d.http_status, 403, "{case}");
            assert!(www(&d).contains("error=\"insufficient_scope\""), "{case}");
        }
    }
    let mut spec = entra_user(&[]);
    spec.tenant = Some("contoso".into());
    expect(
        &decide_inline(&rs256(&spec), "tenant"),
        Outcome::Deny,
        403,
        Reason::ClaimMismatch,
    );
}

#[test]
fn require_when_denies_403_when_false_or_unevaluable() {
    let with_department = |department: Option<&str>| {
        let mut spec = entra_user(&[]);
        if let Some(d) = department {
            spec.extra.insert("department".into(), json!(d));
        }
        rs256(&spec)
    };
    expect(
        &decide_inline(&with_department(Some("finance")), "conditional"),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    expect(
        &decide_inline(&with_department(Some("sales")), "conditional"),
        Outcome::Deny,
        403,
        Reason::ConditionFailed,
    );
    // No `department` claim: the condition cannot be evaluated, which denies (fail closed).
    expect(
        &decide_inline(&with_department(None), "conditional"),
        Outcome::Deny,
        403,
        Reason::ConditionError,
    );
}

#[test]
fn matcher_condition_error_with_a_token_denies_instead_of_falling_through() {
    let mut spec = entra_user(&[]);
    spec.tenant = None;
    let d = decide_inline(&rs256(&spec), "reports");
    expect(&d, Outcome::Deny, 403, Reason::ConditionError);
    assert_eq!(rule(&d), Some("contoso-reports"));
    spec.tenant = Some("contoso".into());
    expect(
        &decide_inline(&rs256(&spec), "reports"),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    spec.tenant = Some("fabrikam".into());
    expect(
        &decide_inline(&rs256(&spec), "reports"),
        Outcome::Deny,
        403,
        Reason::NoMatchingRule,
    );
}

#[test]
fn anonymous_request_gets_401_even_when_a_matcher_condition_reads_claims() {
    let d = decide_inline(NO_TOKEN, "reports");
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    assert_eq!(
        d.www_authenticate.as_deref(),
        Some("Bearer realm=\"inline\"")
    );
    assert_eq!(rule(&d), None);
}

// ---------------------------------------------------------------------------------------------
// Entra: authentication contexts and the claims challenge
// ---------------------------------------------------------------------------------------------

#[test]
fn step_up_when_auth_context_missing_and_client_is_capable() {
    let d = decide_op(
        &rs256(&entra_user(&[])),
        "payments.wire_transfer",
        json!({}),
    );
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    assert_eq!(
        www(&d),
        format!(
            "Bearer realm=\"\", authorization_uri=\"{ENTRA_AUTHORIZE}\", error=\"insufficient_claims\", \
             claims=\"{C1_CLAIMS_B64}\""
        )
    );
    assert_eq!(challenge_claims(www(&d)), entra_challenge_for("c1"));
    assert_eq!(rule(&d), Some("wire-transfer"));
    let step_up = d.step_up.as_ref().expect("structured step-up");
    assert_eq!(step_up.style, "entra");
    assert_eq!(step_up.auth_contexts, strings(&["c1"]));
    assert_eq!(step_up.missing_auth_contexts, strings(&["c1"]));
    assert_eq!(step_up.max_age, Some(900));
    let (json, b64) = step_up.claims.as_ref().expect("claims request");
    assert_eq!(
        json,
        r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#
    );
    assert_eq!(b64, C1_CLAIMS_B64);
    assert_eq!(d.principal.as_ref().map(|p| &*p.subject), Some("alice"));
    assert!(
        d.identity_headers.is_empty(),
        "identity headers are for ALLOW only"
    );
}

#[test]
fn step_up_through_every_door_to_the_wire_transfer_rule() {
    let token = rs256(&entra_user(&[]));
    for d in [
        decide_http(&bearer(&token), "POST", "/payments/wire"),
        decide_http(
            &bearer(&token),
            "POST",
            "/demo.payments.v1.Payments/Transfer",
        ),
        decide_op(&token, "payments.wire_transfer", json!({})),
    ] {
        expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
        assert_eq!(rule(&d), Some("wire-transfer"));
        assert!(
            www(&d).ends_with(&format!("claims=\"{C1_CLAIMS_B64}\"")),
            "{}",
            www(&d)
        );
    }
}

#[test]
fn client_capability_cp1_is_compared_case_insensitively() {
    for xms_cc in [json!(["CP1"]), json!(["Cp1", "other"]), json!("cp1")] {
        let mut spec = entra_user(&[]);
        spec.xms_cc = Vec::new();
        spec.extra.insert("xms_cc".into(), xms_cc.clone());
        let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
        expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
        assert!(
            www(&d).contains("error=\"insufficient_claims\""),
            "xms_cc {xms_cc}"
        );
    }
}

#[test]
fn deny_client_not_capable_when_xms_cc_lacks_cp1() {
    for xms_cc in [vec![], strings(&["cp2"])] {
        let spec = TokenSpec {
            xms_cc,
            ..entra_user(&[])
        };
        let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
        expect(&d, Outcome::Deny, 403, Reason::ClientNotCapable);
        assert!(
            d.www_authenticate.is_none(),
            "no claims challenge for a client that cannot handle it"
        );
        let step_up = d
            .step_up
            .as_ref()
            .expect("the step-up that would have been asked");
        assert_eq!(step_up.missing_auth_contexts, strings(&["c1"]));
        assert_eq!(rule(&d), Some("wire-transfer"));
    }
}

#[test]
fn app_only_tokens_cannot_step_up() {
    let no_scp = TokenSpec {
        scopes: Vec::new(),
        roles: strings(&["Payments.Write"]),
        ..entra_user(&[])
    };
    let mut idtyp_app = entra_user(&[]);
    idtyp_app.extra.insert("idtyp".into(), json!("app"));
    for (case, spec) in [("no scp", no_scp), ("idtyp app", idtyp_app)] {
        let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
        expect(&d, Outcome::Deny, 403, Reason::AppOnlyToken);
        assert!(d.www_authenticate.is_none(), "{case}");
        assert!(d.principal.as_ref().is_some_and(|p| p.app_only), "{case}");
    }
}

#[test]
fn app_only_token_is_allowed_where_nothing_needs_stepping_up() {
    let spec = TokenSpec {
        scopes: Vec::new(),
        roles: strings(&["Payments.Write"]),
        ..entra_user(&[])
    };
    expect(
        &decide_token(&rs256(&spec)),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
}

#[test]
fn allow_with_identity_headers_when_auth_context_present_and_fresh() {
    let d = decide_op(
        &rs256(&entra_user(&["c1"])),
        "payments.wire_transfer",
        json!({}),
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(rule(&d), Some("wire-transfer"));
    assert!(d.www_authenticate.is_none() && d.step_up.is_none());
    assert_eq!(header(&d, "x-stepgate-subject"), Some("alice"));
    assert_eq!(
        header(&d, "x-stepgate-tenant"),
        Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
    );
    assert_eq!(header(&d, "x-stepgate-auth-contexts"), Some("c1"));
    assert_eq!(header(&d, "x-stepgate-rule"), Some("wire-transfer"));
    assert_eq!(d.identity_headers.len(), 4);
}

#[test]
fn token_auth_contexts_are_compared_case_insensitively() {
    let d = decide_op(
        &rs256(&entra_user(&["C1"])),
        "payments.wire_transfer",
        json!({}),
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(header(&d, "x-stepgate-auth-contexts"), Some("c1"));
}

/// A claim's control characters are percent-encoded, and so is `%`: no header line can be
/// injected, and no value reads as another (`admin\u{85}` is not `admin`).
#[test]
fn identity_headers_cannot_carry_control_characters_from_claims() {
    // (`acrs` are read in lower case.)
    for (subject, forwarded, in_list) in [
        (
            "alice\r\nx-injected: 1",
            "alice%0D%0Ax-injected: 1",
            "alice%0D%0Ax-injected:%201",
        ),
        ("admin\u{85}", "admin%C2%85", "admin%C2%85"),
        ("admin%C2%85", "admin%25C2%2585", "admin%25c2%2585"),
        ("100% sure", "100%25 sure", "100%25%20sure"),
        ("admin ", "admin%20", "admin%20"),
        (" admin", "%20admin", "%20admin"),
        ("  ", "%20%20", "%20%20"),
        // Spaces of other kinds, which Go's strings.Fields and Python's split() split on.
        ("Order\u{a0}Admin", "Order\u{a0}Admin", "order%C2%A0admin"),
        ("admin\u{3000}", "admin%E3%80%80", "admin%E3%80%80"),
        ("\u{feff}admin", "%EF%BB%BFadmin", "%EF%BB%BFadmin"),
        ("plain é", "plain é", "plain%20é"),
    ] {
        let spec = TokenSpec {
            subject: subject.into(),
            ..entra_user(&["c1", subject])
        };
        let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
        assert_eq!(
            header(&d, "x-stepgate-subject"),
            Some(forwarded),
            "{subject:?}"
        );
        let contexts = format!("c1 {in_list}");
        assert_eq!(
            header(&d, "x-stepgate-auth-contexts"),
            Some(contexts.as_str()),
            "{subject:?}"
        );
    }
}

/// An old sign-in is challenged for the first required context (its Conditional Access policy's
/// sign-in frequency makes the new one fresh). A token without `auth_time` is not: Entra writes it
/// only when the API's app registration asks for the optional claim, so asking again for a
/// context the token already has would bring back the same token for ever.
#[test]
fn entra_auth_time_freshness_is_challenged_for_the_first_required_context() {
    let cases = [
        (Some(60), Outcome::Allow, Reason::Allowed),
        (Some(900), Outcome::Allow, Reason::Allowed),
        (Some(901), Outcome::StepUp, Reason::AuthTooOld),
        (Some(16 * 60), Outcome::StepUp, Reason::AuthTooOld),
        (None, Outcome::Deny, Reason::StepUpNotExpressible),
    ];
    for (auth_age, outcome, reason) in cases {
        let spec = TokenSpec {
            auth_age,
            ..entra_user(&["c1"])
        };
        let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
        assert_eq!(
            (d.outcome, d.reason),
            (outcome, reason),
            "auth_age {auth_age:?}: {d:#?}"
        );
        if outcome == Outcome::StepUp {
            assert_eq!(d.http_status, 401);
            assert!(
                www(&d).starts_with("Bearer realm=\"\", authorization_uri=\""),
                "{}",
                www(&d)
            );
            assert_eq!(challenge_claims(www(&d)), entra_challenge_for("c1"));
            let step_up = d.step_up.as_ref().unwrap();
            assert!(
                step_up.missing_auth_contexts.is_empty(),
                "c1 is present; only freshness is missing"
            );
            assert!(step_up.claims.is_some());
        }
        if auth_age.is_none() {
            assert_eq!(d.http_status, 403);
            assert!(d.www_authenticate.is_none(), "{d:#?}");
            assert!(
                d.message.contains("auth_time optional claim"),
                "says how to fix it: {}",
                d.message
            );
        }
    }
}

#[test]
fn entra_freshness_without_a_context_to_request_is_403_not_expressible() {
    let spec = TokenSpec {
        auth_age: Some(600),
        ..entra_user(&["c1"])
    };
    let d = decide_inline(&rs256(&spec), "fresh");
    expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
    assert!(d.www_authenticate.is_none());
    let spec = TokenSpec {
        auth_age: Some(200),
        ..spec
    };
    expect(
        &decide_inline(&rs256(&spec), "fresh"),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
}

// ---------------------------------------------------------------------------------------------
// Escalation
// ---------------------------------------------------------------------------------------------

#[test]
fn amount_attribute_escalates_the_wire_transfer_requirement() {
    let c1_only = rs256(&entra_user(&["c1"]));
    let cases = [
        (json!({}), Outcome::Allow),
        (json!({"amount": 500.0}), Outcome::Allow),
        (json!({"amount": 10000.0}), Outcome::Allow),
        (json!({"amount": 10000.5}), Outcome::StepUp),
        (json!({"amount": 25000.0}), Outcome::StepUp),
        (json!({"amount": 25000}), Outcome::StepUp),
    ];
    for (attributes, outcome) in cases {
        let d = decide_op(&c1_only, "payments.wire_transfer", attributes.clone());
        assert_eq!(d.outcome, outcome, "{attributes}: {d:#?}");
    }
}

#[test]
fn large_amount_steps_up_asking_for_c2_when_token_has_only_c1() {
    let d = decide_op(
        &rs256(&entra_user(&["c1"])),
        "payments.wire_transfer",
        json!({"amount": 25000.0}),
    );
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    assert_eq!(challenge_claims(www(&d)), entra_challenge_for("c2"));
    let step_up = d.step_up.as_ref().unwrap();
    assert_eq!(step_up.auth_contexts, strings(&["c1", "c2"]));
    assert_eq!(step_up.missing_auth_contexts, strings(&["c2"]));
    assert_eq!(step_up.max_age, Some(900));
}

#[test]
fn large_amount_asks_for_c1_first_when_token_has_neither() {
    let d = decide_op(
        &rs256(&entra_user(&[])),
        "payments.wire_transfer",
        json!({"amount": 25000.0}),
    );
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    assert_eq!(challenge_claims(www(&d)), entra_challenge_for("c1"));
    assert_eq!(
        d.step_up.as_ref().unwrap().missing_auth_contexts,
        strings(&["c1", "c2"])
    );
}

#[test]
fn small_amount_is_allowed_with_only_c1_and_large_amount_with_c1_and_c2() {
    let d = decide_op(
        &rs256(&entra_user(&["c1"])),
        "payments.wire_transfer",
        json!({"amount": 500.0}),
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    let d = decide_op(
        &rs256(&entra_user(&["c1", "c2"])),
        "payments.wire_transfer",
        json!({"amount": 25000.0}),
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(header(&d, "x-stepgate-auth-contexts"), Some("c1 c2"));
}

#[test]
fn escalation_condition_that_cannot_be_evaluated_escalates() {
    let d = decide_op(
        &rs256(&entra_user(&["c1"])),
        "payments.wire_transfer",
        json!({"amount": "lots"}),
    );
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    assert_eq!(challenge_claims(www(&d)), entra_challenge_for("c2"));
}

// ---------------------------------------------------------------------------------------------
// RFC 9470: acr, amr, max_age (admin rule, demo-oidc)
// ---------------------------------------------------------------------------------------------

/// The demo policy with the admin rule accepting only `acr` `rule_acr`, and escalations on a
/// `DELETE`, each requiring one of `escalations`' acr lists.
fn admin_acr_policy(rule_acr: &str, escalations: &[&str]) -> String {
    let escalate: String = escalations
        .iter()
        .map(|acr| {
            format!(
                "      - when: 'request.method == \"DELETE\"'\n        require: {{ acr: {acr} }}\n"
            )
        })
        .collect();
    DEMO_POLICY
        .replace(
            r#"acr: ["urn:okta:loa:2fa:any", "phr"]"#,
            &format!("acr: {rule_acr}"),
        )
        .replace(
            "      max_age: 1h\n",
            &format!("      max_age: 1h\n    escalate:\n{escalate}"),
        )
}

#[test]
fn an_escalation_narrows_the_accepted_acr_and_never_names_a_weaker_one_in() {
    // The rule accepts phishing-resistant sign-ins only; an escalation listing a two-factor
    // level as well must not let a two-factor token through (it used to replace the list).
    let policy = compile_policy(&admin_acr_policy(
        r#"["phr"]"#,
        &[r#"["phr", "urn:okta:loa:2fa:any"]"#],
    ));
    let two_factor = bearer(&rs256(&oidc_admin()));
    for method in ["GET", "DELETE"] {
        let d = decide(
            &policy,
            &http_request(&two_factor, method, "/admin/users"),
            NOW,
        );
        expect(&d, Outcome::StepUp, 401, Reason::AcrNotAccepted);
        assert_eq!(
            d.step_up.as_ref().unwrap().acr_values,
            strings(&["phr"]),
            "{method}"
        );
    }
    let phr = bearer(&rs256(&TokenSpec {
        acr: Some("phr".to_owned()),
        ..oidc_admin()
    }));
    let d = decide(&policy, &http_request(&phr, "DELETE", "/admin/users"), NOW);
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
}

#[test]
fn acr_lists_that_share_no_value_are_refused_at_load_or_denied_when_combined() {
    // Two lists in force with nothing in common: no token could meet both.
    let text = admin_acr_policy(r#"["phr"]"#, &[r#"["urn:okta:loa:2fa:any"]"#]);
    let e = crate::policy::compile(
        &crate::config::parse(&text).unwrap(),
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")),
    )
    .expect_err("disjoint acr lists");
    assert!(e.path.ends_with(".escalate[0].require.acr"), "{e}");
    assert!(e.message.contains("shares no value"), "{e}");
    // Three lists, each two sharing a value, all three none: the request is refused, not
    // stepped up to a level no sign-in could reach.
    let policy = compile_policy(&admin_acr_policy(
        r#"["urn:okta:loa:2fa:any", "phr"]"#,
        &[r#"["phr", "hwk"]"#, r#"["urn:okta:loa:2fa:any", "hwk"]"#],
    ));
    let token = bearer(&rs256(&oidc_admin()));
    let d = decide(
        &policy,
        &http_request(&token, "DELETE", "/admin/users"),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
    let d = decide(&policy, &http_request(&token, "GET", "/admin/users"), NOW);
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    // Two escalations of one rule are not compared: their conditions may never hold together.
    compile_policy(&admin_acr_policy(
        r#"["urn:okta:loa:2fa:any", "phr"]"#,
        &[r#"["phr"]"#, r#"["urn:okta:loa:2fa:any"]"#],
    ));
}

#[test]
fn rfc9470_step_up_when_acr_missing() {
    let spec = TokenSpec {
        acr: None,
        ..oidc_admin()
    };
    let d = decide_http(&bearer(&rs256(&spec)), "GET", "/admin/users");
    expect(&d, Outcome::StepUp, 401, Reason::AcrNotAccepted);
    assert_eq!(
        www(&d),
        "Bearer realm=\"stepgate-demo\", error=\"insufficient_user_authentication\", \
         error_description=\"authentication level urn:okta:loa:2fa:any or phr is required\", \
         acr_values=\"urn:okta:loa:2fa:any phr\", max_age=3600"
    );
    assert_eq!(rule(&d), Some("admin"));
    let step_up = d.step_up.as_ref().unwrap();
    assert_eq!(step_up.style, "rfc9470");
    assert_eq!(
        step_up.acr_values,
        strings(&["urn:okta:loa:2fa:any", "phr"])
    );
    assert_eq!(step_up.max_age, Some(3600));
    assert_eq!(step_up.amr, strings(&["mfa"]));
    assert!(
        step_up.claims.is_none(),
        "no Entra claims request in RFC 9470 style"
    );
}

#[test]
fn rfc9470_step_up_for_every_unmet_authentication_requirement() {
    let cases = [
        (
            "acr of a weaker level",
            TokenSpec {
                acr: Some("urn:okta:loa:1fa:any".into()),
                ..oidc_admin()
            },
            Reason::AcrNotAccepted,
        ),
        (
            "acr differs in case",
            TokenSpec {
                acr: Some("PHR".into()),
                ..oidc_admin()
            },
            Reason::AcrNotAccepted,
        ),
        (
            "auth too old",
            TokenSpec {
                auth_age: Some(3601),
                ..oidc_admin()
            },
            Reason::AuthTooOld,
        ),
        (
            "no auth_time",
            TokenSpec {
                auth_age: None,
                ..oidc_admin()
            },
            Reason::AuthTimeMissing,
        ),
    ];
    for (case, spec, reason) in cases {
        let d = decide_http(&bearer(&rs256(&spec)), "GET", "/admin/users");
        assert_eq!(
            (d.outcome, d.http_status, d.reason),
            (Outcome::StepUp, 401, reason),
            "{case}: {d:#?}"
        );
        let www = www(&d);
        assert!(
            www.starts_with(
                "Bearer realm=\"stepgate-demo\", error=\"insufficient_user_authentication\""
            ),
            "{case}: {www}"
        );
        assert!(
            www.ends_with(", acr_values=\"urn:okta:loa:2fa:any phr\", max_age=3600"),
            "{case}: {www}"
        );
        assert_eq!(rule(&d), Some("admin"), "{case}");
    }
}

/// An `amr` the token lacks, with its level met and its sign-in fresh, gives an RFC 9470
/// challenge nothing to ask for (the token has the `acr_values`, and a fresh sign-in meets
/// `max_age`): the client would get the same token back. Refused, naming the method; an old
/// sign-in is asked to be renewed, which may bring the method.
#[test]
fn rfc9470_an_amr_alone_unmet_is_refused_and_with_an_old_sign_in_challenged() {
    for (case, amr) in [("amr lacks mfa", strings(&["pwd"])), ("no amr", Vec::new())] {
        let spec = TokenSpec {
            amr,
            ..oidc_admin()
        };
        let d = decide_http(&bearer(&rs256(&spec)), "GET", "/admin/users");
        expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
        assert!(
            d.message.contains("authentication method mfa"),
            "{case}: {}",
            d.message
        );
        assert!(d.www_authenticate.is_none(), "{case}");
        assert_eq!(rule(&d), Some("admin"), "{case}");
        let old = TokenSpec {
            auth_age: Some(3601),
            ..spec
        };
        let d = decide_http(&bearer(&rs256(&old)), "GET", "/admin/users");
        expect(&d, Outcome::StepUp, 401, Reason::MissingAmr);
        assert!(www(&d).ends_with(", max_age=3600"), "{case}: {}", www(&d));
    }
}

#[test]
fn rfc9470_allows_admin_with_fresh_two_factor_sign_in() {
    let alternative_acr = TokenSpec {
        acr: Some("phr".into()),
        auth_age: Some(3600),
        ..oidc_admin()
    };
    for token in [
        rs256(&oidc_admin()),
        rs256(&alternative_acr),
        es256(&oidc_admin()),
    ] {
        for d in [
            decide_http(&bearer(&token), "GET", "/admin/users"),
            decide_op(&token, "admin.users.delete", json!({})),
        ] {
            expect(&d, Outcome::Allow, 200, Reason::Allowed);
            assert_eq!(rule(&d), Some("admin"));
            assert_eq!(header(&d, "x-stepgate-subject"), Some("bob"));
            assert_eq!(header(&d, "x-stepgate-rule"), Some("admin"));
            assert_eq!(
                header(&d, "x-stepgate-tenant"),
                None,
                "no tid claim, no header"
            );
        }
    }
}

#[test]
fn entra_token_on_admin_route_is_401_issuer_not_accepted() {
    let spec = TokenSpec {
        roles: strings(&["Admin"]),
        acr: Some("phr".into()),
        amr: strings(&["mfa"]),
        ..entra_user(&["c1"])
    };
    let d = decide_http(&bearer(&rs256(&spec)), "GET", "/admin/users");
    expect(&d, Outcome::Deny, 401, Reason::IssuerNotAccepted);
    assert_eq!(
        www(&d),
        "Bearer realm=\"stepgate-demo\", error=\"invalid_token\", \
         error_description=\"the access token issuer is not accepted for this resource\""
    );
    assert_eq!(rule(&d), Some("admin"));
    assert!(d.step_up.is_none());
}

#[test]
fn rfc9470_token_missing_an_auth_context_is_not_sent_an_unsatisfiable_challenge() {
    let spec = TokenSpec {
        issuer: DEMO_OIDC_ISSUER.to_owned(),
        acrs: Vec::new(),
        ..oidc_admin()
    };
    let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
    expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
    assert!(d.www_authenticate.is_none());
}

/// `acrs` is Entra's: in the token of an RFC 9470 issuer (whose provider may let anyone with a
/// say over custom claims write it) it satisfies no authentication context.
#[test]
fn an_rfc9470_tokens_acrs_claim_satisfies_no_auth_context() {
    for acrs in [&["c1"][..], &["C1"], &["c1", "c2", "c3"]] {
        let spec = TokenSpec {
            issuer: DEMO_OIDC_ISSUER.to_owned(),
            acrs: strings(acrs),
            ..oidc_admin()
        };
        let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
        expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
        assert!(
            d.verified.as_ref().unwrap().principal.acrs.is_empty(),
            "{acrs:?}"
        );
    }
    // The same claim from the Entra issuer does.
    let d = decide_op(
        &rs256(&entra_user(&["c1"])),
        "payments.wire_transfer",
        json!({}),
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
}

// ---------------------------------------------------------------------------------------------
// challenge: deny
// ---------------------------------------------------------------------------------------------

#[test]
fn deny_style_issuer_answers_403_with_the_step_up_reason_and_no_challenge() {
    let locked = |acrs: &[&str], auth_age: Option<i64>| TokenSpec {
        issuer: DEMO_OIDC_ISSUER.to_owned(),
        acrs: strings(acrs),
        auth_age,
        ..TokenSpec::default()
    };
    let cases = [
        (
            "context missing",
            locked(&[], Some(60)),
            Reason::MissingAuthContext,
        ),
        (
            "sign-in too old",
            locked(&["c1"], Some(901)),
            Reason::AuthTooOld,
        ),
        (
            "no auth_time",
            locked(&["c1"], None),
            Reason::AuthTimeMissing,
        ),
    ];
    for (case, spec, reason) in cases {
        let d = decide_inline(&rs256(&spec), "stepped");
        assert_eq!(
            (d.outcome, d.http_status, d.reason),
            (Outcome::Deny, 403, reason),
            "{case}: {d:#?}"
        );
        assert!(d.www_authenticate.is_none(), "{case}");
        assert_eq!(d.step_up.as_ref().map(|s| s.style), Some("deny"), "{case}");
        assert_eq!(rule(&d), Some("stepped"), "{case}");
    }
    expect(
        &decide_inline(&rs256(&locked(&["c1"], Some(60))), "stepped"),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
}

#[test]
fn inline_entra_issuer_challenges_the_same_requirement() {
    let d = decide_inline(&rs256(&entra_user(&[])), "stepped");
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    assert_eq!(challenge_claims(www(&d)), entra_challenge_for("c1"));
}

// ---------------------------------------------------------------------------------------------
// Anonymous routes
// ---------------------------------------------------------------------------------------------

#[test]
fn anonymous_health_check_is_allowed_without_token() {
    let d = decide_http(NO_TOKEN, "GET", "/healthz");
    expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
    assert_eq!(rule(&d), Some("health"));
    assert_eq!(
        d.identity_headers,
        vec![(Arc::from("x-stepgate-rule"), Arc::from("health"))]
    );
    assert!(d.principal.is_none());
}

#[test]
fn presented_invalid_token_is_refused_even_on_an_anonymous_route() {
    let expired = rs256(&TokenSpec {
        lifetime: -3600,
        ..entra_user(&[])
    });
    for (case, auth) in [
        ("expired", bearer(&expired)),
        ("garbage", bearer("not.a.jwt")),
    ] {
        let d = decide_http(&auth, "GET", "/healthz");
        assert_eq!(
            (d.outcome, d.http_status),
            (Outcome::Deny, 401),
            "{case}: {d:#?}"
        );
        assert!(www(&d).contains("error=\"invalid_token\""), "{case}");
    }
}

#[test]
fn valid_token_on_an_anonymous_route_is_allowed_with_identity() {
    let d = decide_http(&bearer(&rs256(&entra_user(&[]))), "GET", "/healthz");
    expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
    assert_eq!(header(&d, "x-stepgate-subject"), Some("alice"));
}

#[test]
fn anonymous_rule_matches_only_its_method() {
    let d = decide_http(NO_TOKEN, "POST", "/healthz");
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
}

// ---------------------------------------------------------------------------------------------
// No matching rule and the default
// ---------------------------------------------------------------------------------------------

#[test]
fn no_matching_rule_under_default_deny() {
    let token = rs256(&entra_user(&["c1"]));
    let d = decide_inline(&token, "unknown.operation");
    expect(&d, Outcome::Deny, 403, Reason::NoMatchingRule);
    assert_eq!(rule(&d), None);
    assert!(d.principal.is_some());
    let d = decide_inline(NO_TOKEN, "unknown.operation");
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    assert_eq!(
        d.www_authenticate.as_deref(),
        Some("Bearer realm=\"inline\"")
    );

    // The demo policy's catch-all matches a path or an operation; a request with neither falls through.
    let bare = AccessRequest {
        credential: PresentedCredential::Token(token),
        ..AccessRequest::default()
    };
    expect(
        &decide(&demo_policy(), &bare, NOW),
        Outcome::Deny,
        403,
        Reason::NoMatchingRule,
    );
}

#[test]
fn default_allow_authenticated_allows_any_valid_token() {
    let policy = compile_policy(ALLOW_AUTHENTICATED_POLICY);
    let token = rs256(&oidc_admin());
    let d = decide(
        &policy,
        &http_request(&bearer(&token), "GET", "/anything"),
        NOW,
    );
    expect(&d, Outcome::Allow, 200, Reason::DefaultAllowed);
    assert_eq!(rule(&d), None);
    assert_eq!(header(&d, "x-stepgate-subject"), Some("bob"));
    assert_eq!(header(&d, "x-stepgate-rule"), None);

    let d = decide(&policy, &http_request(NO_TOKEN, "GET", "/anything"), NOW);
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    assert_eq!(
        d.www_authenticate.as_deref(),
        Some("Bearer realm=\"stepgate\"")
    );

    let d = decide(
        &policy,
        &http_request(&bearer(&token), "GET", "/reports/q3"),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::MissingScope);
    let expired = rs256(&TokenSpec {
        lifetime: -3600,
        ..oidc_admin()
    });
    let d = decide(
        &policy,
        &http_request(&bearer(&expired), "GET", "/anything"),
        NOW,
    );
    expect(&d, Outcome::Deny, 401, Reason::TokenExpired);
}

// ---------------------------------------------------------------------------------------------
// Paths and gRPC routes
// ---------------------------------------------------------------------------------------------

/// The demo policy with `rule` (YAML, indented as rules are) first, and `upstream` (settings,
/// indented) added to its `upstream` section.
fn with_first_rule(rule: &str, upstream: &str) -> Policy {
    compile_policy(
        &DEMO_POLICY
            .replacen("rules:", &format!("rules:\n{rule}"), 1)
            .replacen("upstream:\n", &format!("upstream:\n{upstream}"), 1),
    )
}

/// The demo policy, its upstream's reading of letter case declared (`upstream.path_case`).
fn with_path_case(case: &str) -> Policy {
    with_first_rule("", &format!("  path_case: {case}\n"))
}

/// Rules compare paths in ASCII lower case; ASP.NET Core ignores the case of `é` too, serving
/// `/DONNÉES/x` from its `/données` route. A glob with such a letter is refused unless the
/// upstream routes in case, where it is compared exactly.
#[test]
fn a_glob_with_a_cased_letter_outside_ascii_is_refused_unless_paths_are_case_sensitive() {
    let rule =
        "  - id: donnees\n    match: { path: \"/données/**\" }\n    require: { roles: [Admin] }";
    for case in ["insensitive", "either", ""] {
        let text = DEMO_POLICY
            .replacen("rules:", &format!("rules:\n{rule}"), 1)
            .replacen(
                "upstream:\n",
                &format!("upstream:\n  path_case: {case}\n"),
                1,
            )
            .replace("  path_case: \n", "");
        let file = crate::config::parse(&text).unwrap();
        let error = crate::policy::compile(&file, std::path::Path::new("examples"))
            .err()
            .unwrap_or_else(|| panic!("path_case {case:?}: compiled"));
        let error = error.to_string();
        assert!(
            error.contains("rules[0].match.path") && error.contains("outside ASCII"),
            "{error}"
        );
    }
    // Encoded, and among other globs: the field is the glob's own.
    let encoded = "  - id: donnees\n    match: { paths: [\"/a/**\", \"/donn%C3%A9es/**\"] }";
    let file =
        crate::config::parse(&DEMO_POLICY.replacen("rules:", &format!("rules:\n{encoded}"), 1))
            .unwrap();
    let error = crate::policy::compile(&file, std::path::Path::new("examples"))
        .expect_err("refused")
        .to_string();
    assert!(error.contains("rules[0].match.paths[1]"), "{error}");

    let policy = with_first_rule(rule, "  path_case: sensitive\n");
    let token = bearer(&rs256(&entra_user(&["c1"])));
    let d = decide(&policy, &http_request(&token, "GET", "/données/x"), NOW);
    expect(&d, Outcome::Deny, 403, Reason::MissingRole);
    // Digits, symbols and letters without case (`日本`) are no trouble.
    let _ = with_first_rule(
        "  - id: jp\n    match: { path: \"/日本/v2/**\" }\n    require: { roles: [Admin] }",
        "",
    );
}

/// `/healthz/` is `/healthz` to ASP.NET Core and another route to Go's ServeMux and Flask
/// (`/{org}/`). A path with a trailing slash must pick the same rule read either way, or it is
/// refused: the public health rule does not open `/healthz/`, and a protective rule written
/// without the slash is not skipped for it either.
#[test]
fn a_trailing_slash_that_picks_another_rule_is_ambiguous() {
    for case in ["either", "insensitive", "sensitive"] {
        let policy = with_path_case(case);
        let d = decide(&policy, &http_request("", "GET", "/healthz/"), NOW);
        expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
        assert!(d.message.contains("ends with /"), "{case}: {}", d.message);
        assert_eq!(
            www(&d),
            format!(
                "Bearer realm=\"stepgate-demo\", error=\"invalid_request\", error_description=\"{}\"",
                d.message
            )
        );
        let d = decide(&policy, &http_request("", "GET", "/healthz"), NOW);
        expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
    }
    let token = bearer(&rs256(&entra_user(&["c1"])));
    // A protective rule is not skipped for the slash either: without it, some upstreams would
    // serve the personal data under the catch-all's weaker requirement.
    let d = decide_http(&token, "GET", "/customers/42/pii/");
    expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
    // A glob ending in `**` takes both readings: no ambiguity.
    let d = decide_http(&token, "GET", "/admin/users/");
    assert_ne!(d.reason, Reason::AmbiguousPath, "{d:#?}");
    assert_eq!(rule(&d), Some("admin"));
    // Written with the slash, the rule is the path's own either way.
    let policy = with_first_rule(
        "  - id: reports\n    match: { paths: [/reports, /reports/] }\n    require: { roles: [Admin] }",
        "",
    );
    let d = decide(&policy, &http_request(&token, "GET", "/reports/"), NOW);
    expect(&d, Outcome::Deny, 403, Reason::MissingRole);
    assert_eq!(rule(&d), Some("reports"));
    // And the root is no trailing slash.
    let d = decide(&policy, &http_request(&token, "GET", "/"), NOW);
    assert_ne!(d.reason, Reason::AmbiguousPath, "{d:#?}");
}

/// Rails serves `POST /payments/wire.json` from its `payments#wire` route (every route takes an
/// optional `(.:format)` unless drawn with `format: false`), and Spring MVC up to 5.2 maps
/// `/payments/wire` to `/payments/wire.*`. A path whose last segment has an extension must pick
/// the same rule without it, or it is refused: the catch-all does not decide the wire transfer
/// or the personal data for a token that meets neither's requirement.
#[test]
fn an_extension_that_picks_another_rule_is_ambiguous() {
    let token = bearer(&rs256(&entra_user(&[])));
    for (method, target, protective) in [
        ("POST", "/payments/wire", "wire-transfer"),
        ("GET", "/customers/42/pii", "customer-pii"),
    ] {
        let d = decide_http(&token, method, target);
        assert_eq!(rule(&d), Some(protective));
        assert!(!d.is_allow(), "{target}: {d:#?}");
    }
    for (method, target) in [
        ("POST", "/payments/wire.json"),
        ("POST", "/payments/wire.xml"),
        ("POST", "/payments/wire.x.json"),
        ("POST", "/payments/wire.json/"),
        ("GET", "/customers/42/pii.json"),
        ("GET", "/customers/42/pii.json?expand=all"),
    ] {
        let d = decide_http(&token, method, target);
        expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
        assert!(d.message.contains("extension"), "{target}: {}", d.message);
        let anonymous = decide_http("", method, target);
        expect(&anonymous, Outcome::Deny, 400, Reason::AmbiguousPath);
        assert_eq!(rule(&anonymous), None, "named to no anonymous caller");
    }
    // An encoded dot, under globs that spell none, is decoded: the extension reading refuses it.
    let d = decide_http(&token, "POST", "/payments/wire%2ejson");
    expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
    // A path whose readings agree is decided as usual: an extension under a glob that takes
    // either, a dot that starts a name, a dot in a segment before the last.
    for target in [
        "/api/orders/42.json",
        "/api/.well-known/x",
        "/api/v1.2/orders",
        "/api/orders/.env",
    ] {
        let d = decide_http(&token, "GET", target);
        assert_ne!(d.reason, Reason::AmbiguousPath, "{target}: {d:#?}");
    }
    // A rule that names both spellings decides them both.
    let both = with_first_rule(
        "  - id: wire-both\n    match: { methods: [POST], paths: [/payments/wire, /payments/wire.*] }\n    require: { roles: [Admin] }",
        "",
    );
    let d = decide(
        &both,
        &http_request(&token, "POST", "/payments/wire.json"),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::MissingRole);
    assert_eq!(rule(&d), Some("wire-both"));
    // An upstream that routes the path as sent: the catch-all's, as written.
    let exact = with_first_rule("", "  format_suffix: exact\n");
    let d = decide(
        &exact,
        &http_request(&token, "POST", "/payments/wire.json"),
        NOW,
    );
    assert_eq!(rule(&d), Some("everything-else"));
}

/// Conditions that read the path see it as the upstreams that cut a trailing slash or an
/// extension route it, in either letter case: an escalation on `/export` holds for
/// `/reports/EXPORT.csv` and `/reports/export/`, and a matcher's condition that holds for one
/// reading of a trailing slash and not another refuses the request rather than letting the
/// catch-all decide it. The extension is read so by escalations only: a matcher or a
/// requirement testing it (`endsWith(".pdf")`) decides its own requests.
#[test]
fn conditions_read_the_path_without_its_trailing_slash_or_extension_too() {
    let exports = with_escalating_rule(
        "reports",
        "/reports/**",
        "request.path.endsWith(\"/export\")",
    );
    let token = bearer(&rs256(&entra_user(&[])));
    for target in [
        "/reports/export",
        "/reports/export.csv",
        "/reports/export/",
        "/reports/EXPORT",
        "/reports/EXPORT/",
        "/reports/EXPORT.csv",
        // Rails drops the trailing slash, then the format.
        "/reports/export.csv/",
        "/reports/EXPORT.csv/",
        "/reports/export.tar.gz/",
    ] {
        for method in ["GET", "HEAD"] {
            let d = decide(&exports, &http_request(&token, method, target), NOW);
            assert_eq!(rule(&d), Some("reports"), "{method} {target}");
            expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
        }
    }
    let d = decide(
        &exports,
        &http_request(&token, "GET", "/reports/q4.csv"),
        NOW,
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    // A matcher whose condition picks the wire transfer by its path.
    let by_condition = with_rules(
        "  - id: wire-by-path\n    match: { path: \"/payments/**\", when: 'request.path == \"/payments/wire\"' }\n    require: { auth_contexts: [c1] }\n",
    );
    for target in ["/payments/wire/", "/payments/WIRE/", "/payments/WIRE"] {
        let d = decide(&by_condition, &http_request(&token, "POST", target), NOW);
        assert_ne!(rule(&d), Some("everything-else"), "{target}: {d:#?}");
        assert!(!d.is_allow(), "{target}: {d:#?}");
    }
    let d = decide(
        &by_condition,
        &http_request(&token, "POST", "/payments/other"),
        NOW,
    );
    assert_eq!(rule(&d), Some("everything-else"));
    // Conditions on the extension decide the requests they were written for.
    let pdfs = with_rules(
        "  - id: pdfs\n    match: { path: \"/files/**\", when: 'request.path.endsWith(\".pdf\")' }\n    require: { authenticated: true }\n  \
         - id: downloads\n    match: { path: \"/downloads/**\" }\n    require: { authenticated: true, when: 'request.path.matches(\"[.](pdf|csv)$\")' }\n",
    );
    for (target, expected) in [("/files/a.pdf", "pdfs"), ("/downloads/q4.pdf", "downloads")] {
        let d = decide(&pdfs, &http_request(&token, "GET", target), NOW);
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
        assert_eq!(rule(&d), Some(expected), "{target}");
    }
}

#[test]
fn letter_case_cannot_bypass_the_admin_rule_nor_encoded_letters_and_repeated_slashes() {
    let entra = bearer(&rs256(&entra_user(&["c1"])));
    let oidc = bearer(&rs256(&oidc_admin()));
    let insensitive = with_path_case("insensitive");
    for target in ["/admin/users", "/ADMIN/users", "/Admin/users/"] {
        let d = decide(&insensitive, &http_request(&entra, "GET", target), NOW);
        expect(&d, Outcome::Deny, 401, Reason::IssuerNotAccepted);
        assert_eq!(rule(&d), Some("admin"), "{target}");
        let d = decide(&insensitive, &http_request(&oidc, "GET", target), NOW);
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
        assert_eq!(rule(&d), Some("admin"), "{target}");
    }
    // Not knowing the upstream's reading of case, `/ADMIN` is refused: `/admin/**` to a server
    // that ignores case, the catch-all's to one that does not.
    for target in ["/ADMIN/users", "/Admin/users"] {
        let d = decide_http(&oidc, "GET", target);
        expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
        assert_eq!(rule(&d), Some("admin"), "{target}");
        let anonymous = decide_http("", "GET", target);
        expect(&anonymous, Outcome::Deny, 400, Reason::AmbiguousPath);
        assert_eq!(rule(&anonymous), None, "named to no anonymous caller");
    }
    // Encoded letters and repeated slashes are refused before any rule is read: decoded and
    // merged they are `/admin/users`, and as sent another route to Express.
    for target in ["/%61dmin/users", "//admin//users", "/%41dmin/users"] {
        for policy in [&insensitive, &demo_policy()] {
            let d = decide(policy, &http_request(&oidc, "GET", target), NOW);
            expect(&d, Outcome::Deny, 400, Reason::InvalidPath);
        }
    }
}

/// A public rule's path spelled as one upstream reads it and not another: decoded or merged by
/// stepgate, as sent by Express (`/%64ocs/billing` is its `/:org/billing`, `//docs/x` its
/// catch-all); a leading-dot segment with an extension (Rails serves `/.settings.json` from its
/// `/.settings` route).
#[test]
fn spellings_an_upstream_reads_another_way_do_not_pick_the_public_rule() {
    let policy = compile_policy(
        "issuers:\n  - id: demo\n    issuer: https://issuer.example\n    \
         jwks_file: demo-keys/jwks.json\n    audiences: [api]\nrules:\n\
         \x20 - { id: settings, match: { path: /.settings }, require: { scopes: [admin] } }\n\
         \x20 - { id: docs, match: { methods: [GET], path: \"/docs/**\" }, allow_anonymous: true }\n\
         \x20 - { id: json, match: { methods: [GET], path: \"/**/*.json\" }, allow_anonymous: true }\n\
         \x20 - { id: rest, match: { path: \"/**\" } }\n",
    );
    for (target, reason) in [
        ("/%64ocs/billing", Reason::InvalidPath),
        ("//docs/billing", Reason::InvalidPath),
        ("/docs//billing", Reason::InvalidPath),
        ("/.settings.json", Reason::AmbiguousPath),
        ("/.env.json", Reason::AmbiguousPath),
    ] {
        let d = decide(&policy, &http_request("", "GET", target), NOW);
        expect(&d, Outcome::Deny, 400, reason);
    }
    for target in ["/docs/billing", "/docs/x.json", "/docs/.env.json"] {
        let d = decide(&policy, &http_request("", "GET", target), NOW);
        expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
    }
    // A character the globs spell as it is, sent encoded: the public rule's decoded, another
    // route's as sent (Express, a gRPC transcoder finding the `:verb`); and `+` under a glob
    // spelling a space, which Sinatra reads as one.
    let policy = compile_policy(
        "issuers:\n  - id: demo\n    issuer: https://issuer.example\n    \
         jwks_file: demo-keys/jwks.json\n    audiences: [api]\nrules:\n\
         \x20 - { id: files, match: { path: \"/files/annual reports/**\" }, require: { scopes: [admin] } }\n\
         \x20 - { id: public, match: { methods: [GET], paths: [\"/v1/*:search\", \"/odata/$metadata\", \"/files/**\"] }, allow_anonymous: true }\n\
         \x20 - { id: rest, match: { path: \"/**\" } }\n",
    );
    for target in [
        "/v1/secret%3Asearch",
        "/v1/secret%3asearch",
        "/odata/%24metadata",
        "/files/annual+reports/x",
    ] {
        let d = decide(&policy, &http_request("", "GET", target), NOW);
        expect(&d, Outcome::Deny, 400, Reason::InvalidPath);
    }
    for target in [
        "/v1/secret:search",
        "/odata/$metadata",
        "/files/q4%7E.pdf",
        "/files/a%20b.pdf",
    ] {
        let d = decide(&policy, &http_request("", "GET", target), NOW);
        expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
    }
    // A condition comparing the path with a literal spells its characters as a glob does.
    let policy = compile_policy(
        "issuers:\n  - id: demo\n    issuer: https://issuer.example\n    \
         jwks_file: demo-keys/jwks.json\n    audiences: [api]\nrules:\n\
         \x20 - { id: search, match: { path: \"/**\", when: \"request.path.endsWith(':search')\" }, allow_anonymous: true }\n\
         \x20 - { id: rest, match: { path: \"/**\" } }\n",
    );
    let d = decide(
        &policy,
        &http_request("", "GET", "/v1/secret%3Asearch"),
        NOW,
    );
    expect(&d, Outcome::Deny, 400, Reason::InvalidPath);
    let d = decide(&policy, &http_request("", "GET", "/v1/secret:search"), NOW);
    expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
}

/// A weaker rule's glob in another case (`/DOCS/billing` against a public `/docs/**`): to Flask
/// that is `/<org>/billing`, a protected handler. Refused unless the policy says how the upstream
/// reads case; read in case, it is not the public rule's.
#[test]
fn the_letter_case_of_a_public_path_does_not_open_a_case_sensitive_upstreams_other_routes() {
    let public = |case: &str| {
        with_first_rule(
            "  - id: docs\n    match: { path: \"/docs/**\" }\n    allow_anonymous: true",
            &format!("  path_case: {case}\n"),
        )
    };
    let anonymous =
        |policy: &Policy, target: &str| decide(policy, &http_request("", "GET", target), NOW);
    for case in ["either", "sensitive", "insensitive"] {
        let d = anonymous(&public(case), "/docs/billing");
        assert_eq!(
            (d.reason, rule(&d)),
            (Reason::AnonymousAllowed, Some("docs")),
            "{case}"
        );
    }
    let d = anonymous(&public("either"), "/DOCS/billing");
    expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
    let d = anonymous(&public("sensitive"), "/DOCS/billing");
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    let d = anonymous(&public("insensitive"), "/DOCS/billing");
    assert_eq!(
        (d.reason, rule(&d)),
        (Reason::AnonymousAllowed, Some("docs"))
    );

    // A glob written in upper case is read in its case too: the two readings of a path without
    // upper-case letters differ, and `sensitive` matches it as written.
    let upper = |case: &str| {
        with_first_rule(
            "  - id: home\n    match: { path: \"/Home/**\" }\n    allow_anonymous: true",
            &format!("  path_case: {case}\n"),
        )
    };
    let d = anonymous(&upper("either"), "/home/index");
    expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
    let d = anonymous(&upper("either"), "/Home/Index");
    assert_eq!(
        (d.reason, rule(&d)),
        (Reason::AnonymousAllowed, Some("home"))
    );
    let d = anonymous(&upper("sensitive"), "/home/index");
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    let d = anonymous(&upper("insensitive"), "/home/index");
    assert_eq!(
        (d.reason, rule(&d)),
        (Reason::AnonymousAllowed, Some("home"))
    );
}

/// Go, Node and nginx serve `/admin/..;/healthz` from `/admin`; Tomcat and Spring serve
/// `/healthz`. Deciding either reading lets the other one through, so none is decided.
#[test]
fn paths_that_servers_read_differently_are_refused_before_any_rule_applies() {
    for target in [
        "/admin/..;/healthz",
        "/admin/.;/healthz",
        "/admin/%2e%2e;/healthz",
        "/admin/%2E%2E/healthz",
        "/x/;/../healthz",
        "/admin/../healthz",
        "/healthz/.",
        "/healthz;x",
        "/admin%252f..%252fhealthz",
    ] {
        for credential in [NO_TOKEN.to_owned(), bearer(&rs256(&oidc_admin()))] {
            let d = decide_http(&credential, "GET", target);
            expect(&d, Outcome::Deny, 400, Reason::InvalidPath);
            assert_eq!(rule(&d), None, "{target}");
            assert!(
                www(&d).starts_with("Bearer realm=\"stepgate-demo\", error=\"invalid_request\""),
                "{target}: {}",
                www(&d)
            );
        }
    }
    // The unambiguous neighbours are decided as before.
    expect(
        &decide_http(NO_TOKEN, "GET", "/healthz"),
        Outcome::Allow,
        200,
        Reason::AnonymousAllowed,
    );
    for target in ["/.well-known/openid", "/a..b/c", "/reports/q3.v2"] {
        let d = decide_http(NO_TOKEN, "GET", target);
        expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    }
}

#[test]
fn ambiguous_paths_are_400_invalid_path() {
    let token = bearer(&rs256(&oidc_admin()));
    for target in [
        "/admin%2Fusers",
        "/admin%5cusers",
        "/admin\\users",
        "/a%zz",
        "admin/users",
    ] {
        for auth in [NO_TOKEN, token.as_str()] {
            let d = decide_http(auth, "GET", target);
            expect(&d, Outcome::Deny, 400, Reason::InvalidPath);
            assert!(www(&d).contains("error=\"invalid_request\""), "{target}");
            assert_eq!(rule(&d), None, "{target}");
        }
    }
}

#[test]
fn grpc_route_is_decided_by_the_wire_transfer_rule() {
    let d = decide_http(
        &bearer(&rs256(&entra_user(&["c1"]))),
        "POST",
        "/demo.payments.v1.Payments/Transfer",
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(rule(&d), Some("wire-transfer"));
    assert_eq!(header(&d, "x-stepgate-rule"), Some("wire-transfer"));
    // Another method of the same service is not a transfer.
    let d = decide_http(
        &bearer(&rs256(&entra_user(&[]))),
        "POST",
        "/demo.payments.v1.Payments/List",
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(rule(&d), Some("everything-else"));
}

// ---------------------------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------------------------

#[test]
fn explain_true_yields_the_ordered_steps_and_false_yields_none() {
    let token = rs256(&entra_user(&[]));
    let mut request = op_request(&token, "payments.wire_transfer", json!({}));
    let policy = demo_policy();

    request.explain = true;
    let d = decide(&policy, &request, NOW);
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    let stages: Vec<_> = d.explain.iter().map(|s| s.stage).collect();
    assert_eq!(
        stages,
        vec!["token", "match", "escalate", "require", "challenge"]
    );
    assert!(d.explain.iter().all(|s| !s.detail.is_empty()));
    assert!(
        d.explain[1].detail.contains("wire-transfer"),
        "{:?}",
        d.explain[1]
    );

    request.explain = false;
    let d = decide(&policy, &request, NOW);
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    assert!(d.explain.is_empty());
}

#[test]
fn explain_covers_allow_and_early_refusals() {
    let policy = demo_policy();
    let mut allow = op_request(
        &rs256(&entra_user(&["c1"])),
        "payments.wire_transfer",
        json!({}),
    );
    allow.explain = true;
    let stages: Vec<_> = decide(&policy, &allow, NOW)
        .explain
        .iter()
        .map(|s| s.stage)
        .collect();
    assert_eq!(stages, vec!["token", "match", "escalate", "decision"]);

    let mut bad = http_request("Basic dXNlcjpwYXNz", "GET", "/admin");
    bad.explain = true;
    let stages: Vec<_> = decide(&policy, &bad, NOW)
        .explain
        .iter()
        .map(|s| s.stage)
        .collect();
    assert_eq!(stages, vec!["credential"]);
}

// ---------------------------------------------------------------------------------------------
// Token verification negatives
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn expect_invalid(token: &str, reason: Reason) {
    let d = decide_token(token);
    expect(&d, Outcome::Deny, 401, reason);
    assert!(www(&d).contains("error=\"invalid_token\""), "{}", www(&d));
    assert!(d.principal.is_none());
}

#[test]
fn expired_token_is_refused_beyond_the_leeway_only() {
    let cases = [
        (-3600, Some(Reason::TokenExpired)),
        (-61, Some(Reason::TokenExpired)),
        (-60, None),
        (-30, None),
        (1, None),
    ];
    for (lifetime, refused) in cases {
        let token = rs256(&TokenSpec {
            lifetime,
            ..entra_user(&[])
        });
        match refused {
            Some(reason) => expect_invalid(&token, reason),
            None => expect(&decide_token(&token), Outcome::Allow, 200, Reason::Allowed),
        }
    }
}

#[test]
fn token_not_yet_valid_is_refused_beyond_the_leeway_only() {
    let spec = entra_user(&[]);
    let at = |nbf: i64| sign_claims(&claims_with(&spec, json!({"nbf": nbf, "iat": nbf})));
    expect_invalid(&at(NOW + 3600), Reason::TokenNotYetValid);
    expect_invalid(&at(NOW + 61), Reason::TokenNotYetValid);
    expect(
        &decide_token(&at(NOW + 30)),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
}

#[test]
fn token_from_an_unknown_issuer_is_refused() {
    expect_invalid(
        &rs256(&TokenSpec {
            issuer: "https://evil.example/".into(),
            ..entra_user(&[])
        }),
        Reason::IssuerUnknown,
    );
    // `iss` must match exactly: no trailing slash, no case folding.
    expect_invalid(
        &rs256(&TokenSpec {
            issuer: format!("{DEMO_ENTRA_ISSUER}/"),
            ..entra_user(&[])
        }),
        Reason::IssuerUnknown,
    );
    expect_invalid(
        &sign_claims(&claims_with(&entra_user(&[]), json!({"iss": null}))),
        Reason::IssuerUnknown,
    );
}

#[test]
fn token_for_another_audience_is_refused() {
    expect_invalid(
        &rs256(&TokenSpec {
            audience: "api://other".into(),
            ..entra_user(&[])
        }),
        Reason::AudienceMismatch,
    );
    expect_invalid(
        &sign_claims(&claims_with(&entra_user(&[]), json!({"aud": null}))),
        Reason::AudienceMismatch,
    );
    expect_invalid(
        &sign_claims(&claims_with(
            &entra_user(&[]),
            json!({"aud": ["api://a", "api://b"]}),
        )),
        Reason::AudienceMismatch,
    );
    let listed = sign_claims(&claims_with(
        &entra_user(&[]),
        json!({"aud": ["api://a", DEMO_AUDIENCE]}),
    ));
    expect(&decide_token(&listed), Outcome::Allow, 200, Reason::Allowed);
}

#[test]
fn token_signed_under_an_unknown_kid_is_refused() {
    let claims = entra_user(&[]).claims(NOW);
    let unknown = demo::sign(
        &claims,
        &demo_file("demo-rsa-private.pem"),
        Algorithm::RS256,
        "rotated-away",
    )
    .unwrap();
    expect_invalid(&unknown, Reason::UnknownKid);
    // Without a kid the two-key demo set is ambiguous.
    let no_kid = sign_raw(
        &json!({"alg": "RS256", "typ": "JWT"}),
        &claims,
        &rsa_key(),
        Algorithm::RS256,
    );
    expect_invalid(&no_kid, Reason::UnknownKid);
    // A kid of 257 bytes is not looked up (nor remembered as unknown): malformed. 256 is read.
    for (len, reason) in [(257, Reason::TokenMalformed), (256, Reason::UnknownKid)] {
        let long = sign_raw(
            &json!({"alg": "RS256", "typ": "JWT", "kid": "k".repeat(len)}),
            &claims,
            &rsa_key(),
            Algorithm::RS256,
        );
        expect_invalid(&long, reason);
    }
}

#[test]
fn alg_none_is_never_allowed() {
    let payload = b64_json(&entra_user(&["c1"]).claims(NOW));
    let header = b64_json(&json!({"alg": "none", "typ": "JWT"}));
    let cases = [
        (format!("{header}.{payload}."), Reason::TokenMalformed),
        (
            format!("{header}.{payload}.c2lnbmF0dXJl"),
            Reason::AlgorithmNotAllowed,
        ),
        (
            format!(
                "{}.{payload}.c2lnbmF0dXJl",
                b64_json(&json!({"alg": "None", "kid": DEMO_RSA_KID}))
            ),
            Reason::AlgorithmNotAllowed,
        ),
    ];
    for (token, reason) in cases {
        let d = decide_op(&token, "payments.wire_transfer", json!({}));
        assert!(!d.is_allow());
        expect_invalid(&token, reason);
    }
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    let jwks: Value = serde_json::from_slice(&demo_file("jwks.json")).unwrap();
    let rsa_jwk = &jwks["keys"][0];
    assert_eq!(rsa_jwk["kid"], DEMO_RSA_KID);
    let claims = entra_user(&["c1"]).claims(NOW);
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": DEMO_RSA_KID});
    // The classic key-confusion secrets: the public key's JWK text and its raw modulus.
    let modulus = URL_SAFE_NO_PAD
        .decode(rsa_jwk["n"].as_str().unwrap())
        .unwrap();
    for secret in [rsa_jwk.to_string().into_bytes(), modulus] {
        let token = sign_raw(
            &header,
            &claims,
            &EncodingKey::from_secret(&secret),
            Algorithm::HS256,
        );
        expect_invalid(&token, Reason::AlgorithmNotAllowed);
    }
}

#[test]
fn forbidden_header_parameters_are_refused_even_when_properly_signed() {
    let claims = entra_user(&["c1"]).claims(NOW);
    let cases = [
        (
            json!({"jku": "https://evil.example/jwks.json"}),
            Reason::TokenHeaderForbidden,
        ),
        (
            json!({"x5u": "https://evil.example/cert.pem"}),
            Reason::TokenHeaderForbidden,
        ),
        (
            json!({"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}),
            Reason::TokenHeaderForbidden,
        ),
        (
            json!({"crit": ["exp"], "exp": 1}),
            Reason::TokenHeaderForbidden,
        ),
        (json!({"crit": []}), Reason::TokenHeaderForbidden),
        (json!({"nonce": "graph-nonce"}), Reason::TokenUnverifiable),
    ];
    for (extra, reason) in cases {
        let mut header = json!({"alg": "RS256", "typ": "JWT", "kid": DEMO_RSA_KID});
        header
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let token = sign_raw(&header, &claims, &rsa_key(), Algorithm::RS256);
        expect_invalid(&token, reason);
    }
    // The same header without the extra parameter is fine: the refusal is the parameter's.
    let clean = sign_raw(
        &json!({"alg": "RS256", "typ": "JWT", "kid": DEMO_RSA_KID}),
        &claims,
        &rsa_key(),
        Algorithm::RS256,
    );
    expect(&decide_token(&clean), Outcome::Allow, 200, Reason::Allowed);
}

#[test]
fn truncated_tokens_are_refused() {
    let token = rs256(&entra_user(&[]));
    let (two_segments, _) = token.rsplit_once('.').unwrap();
    expect_invalid(two_segments, Reason::TokenMalformed);
    expect_invalid(&format!("{two_segments}."), Reason::TokenMalformed);
    let d = decide_token(&token[..token.len() - 10]);
    assert_eq!((d.outcome, d.http_status), (Outcome::Deny, 401), "{d:#?}");
    assert!(
        matches!(d.reason, Reason::SignatureInvalid | Reason::TokenMalformed),
        "{d:#?}"
    );
    expect_invalid(&format!("{token}.extra"), Reason::TokenMalformed);
}

#[test]
fn garbage_segments_are_token_malformed() {
    let token = rs256(&entra_user(&[]));
    let parts: Vec<&str> = token.split('.').collect();
    let not_json = URL_SAFE_NO_PAD.encode("hello");
    let array = URL_SAFE_NO_PAD.encode("[1,2]");
    let cases = [
        "%%%.***.$$$".to_owned(),
        format!("{not_json}.{not_json}.{not_json}"),
        format!("{array}.{}.{}", parts[1], parts[2]),
        format!("{}.{not_json}.{}", parts[0], parts[2]),
        format!("{}.{}.!!!not-base64!!!", parts[0], parts[1]),
        format!(
            "{}.{}.{}",
            b64_json(&json!({"typ": "JWT"})),
            parts[1],
            parts[2]
        ),
        format!(
            "{}.{}.{}",
            b64_json(&json!({"alg": "RS256", "kid": 7})),
            parts[1],
            parts[2]
        ),
    ];
    for token in cases {
        expect_invalid(&token, Reason::TokenMalformed);
    }
}

/// A compact JWS over these exact header and payload bytes, each segment base64url-encoded with
/// `pad` appended, correctly signed with the demo RSA key.
fn sign_bytes(header: &[u8], payload: &[u8], pad: &str) -> String {
    let message = format!(
        "{}{pad}.{}{pad}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &rsa_key(), Algorithm::RS256).unwrap();
    format!("{message}.{signature}")
}

#[test]
fn validly_signed_tokens_spelled_loosely_are_malformed() {
    let header = format!(r#"{{"alg":"RS256","kid":"{DEMO_RSA_KID}"}}"#);
    let payload = entra_user(&["c1"]).claims(NOW).to_string();
    // The strict spelling of the same token is fine.
    let strict = sign_bytes(header.as_bytes(), payload.as_bytes(), "");
    expect(&decide_token(&strict), Outcome::Allow, 200, Reason::Allowed);

    let with = |member: &str| payload.replacen('{', &format!("{{{member},"), 1);
    let mut cases = vec![
        // base64 padding, which RFC 7515 §2 leaves out, on a signed segment ...
        (
            "padded segments",
            sign_bytes(
                b"{\"alg\":\"RS256\",\"kid\":\"stepgate-demo-rsa-1\"}",
                payload.as_bytes(),
                "=",
            ),
        ),
        // ... and on the signature.
        ("padded signature", format!("{strict}=")),
        (
            "a raw control character",
            sign_bytes(
                header.as_bytes(),
                with("\"x\":\"\u{fffd}\"")
                    .replace('\u{fffd}', "\u{1}")
                    .as_bytes(),
                "",
            ),
        ),
        (
            "repeated name",
            sign_bytes(header.as_bytes(), with(r#""sub":"mallory""#).as_bytes(), ""),
        ),
        (
            "repeated header name",
            sign_bytes(
                header.replacen('{', r#"{"alg":"none","#, 1).as_bytes(),
                payload.as_bytes(),
                "",
            ),
        ),
        (
            "repeated nested name",
            sign_bytes(
                header.as_bytes(),
                with(r#""ext":{"a":1,"a":2}"#).as_bytes(),
                "",
            ),
        ),
        (
            "lone surrogate",
            sign_bytes(header.as_bytes(), with(r#""x":"\udc00""#).as_bytes(), ""),
        ),
    ];
    let mut raw = with(r#""x":"??""#).into_bytes();
    let at = raw.windows(2).position(|w| w == b"??").unwrap();
    raw[at..at + 2].copy_from_slice(&[0xc0, 0xaf]);
    cases.push(("overlong UTF-8", sign_bytes(header.as_bytes(), &raw, "")));
    raw[at..at + 2].copy_from_slice(&[0xff, 0xfe]);
    cases.push((
        "bytes that are not UTF-8",
        sign_bytes(header.as_bytes(), &raw, ""),
    ));
    let mut raw_header = header.clone().into_bytes();
    raw_header.splice(1..1, *b"\"x\":\"\xed\xa0\x80\",");
    cases.push((
        "a surrogate in the header",
        sign_bytes(&raw_header, payload.as_bytes(), ""),
    ));
    for (what, token) in cases {
        let d = decide_token(&token);
        assert_eq!(
            (d.outcome, d.http_status, d.reason),
            (Outcome::Deny, 401, Reason::TokenMalformed),
            "{what}: {d:#?}"
        );
    }
}

#[test]
fn id_tokens_are_refused_unless_the_issuer_allows_their_members() {
    let spec = entra_user(&["c1"]);
    for member in [
        json!({"nonce": "n-0S6_WzA2Mj"}),
        json!({"at_hash": "77QmUPtjPfzWtF2AnpK9RQ"}),
        json!({"c_hash": "LDktKdoQak3Pk0cnXxCltA"}),
        // Keycloak types its tokens in the payload.
        json!({"typ": "ID"}),
        json!({"typ": "Logout"}),
        json!({"typ": "Refresh"}),
    ] {
        let token = sign_claims(&claims_with(&spec, member.clone()));
        let d = decide_token(&token);
        expect(&d, Outcome::Deny, 401, Reason::TokenTypeInvalid);
        assert!(
            d.message.contains("an ID token is not an access token"),
            "{}",
            d.message
        );
        let opted_out = compile_policy(&DEMO_POLICY.replacen(
            "    challenge: entra\n",
            "    challenge: entra\n    refuse_id_tokens: false\n",
            1,
        ));
        let d = decide(
            &opted_out,
            &op_request(&token, "inventory.list", json!({})),
            NOW,
        );
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
    }
    // A forged one is a bad signature first: nothing in an unverified payload is believed.
    let token = sign_claims(&claims_with(&spec, json!({"nonce": "n"})));
    let (body, _) = token.rsplit_once('.').unwrap();
    expect(
        &decide_token(&format!("{body}.{}", URL_SAFE_NO_PAD.encode([7u8; 256]))),
        Outcome::Deny,
        401,
        Reason::SignatureInvalid,
    );
}

/// A token bound to its holder's key by a proof stepgate does not check (DPoP's `jkt`, a `jwk`,
/// more than one member) proves nothing as a bearer: refused unless the issuer says the proxy
/// checks the binding. A client certificate's `x5t#S256` in any spelling but its one canonical
/// one is a malformed claim (RFC 8705's own example sets stray bits in its last character).
#[test]
fn a_token_bound_by_a_proof_stepgate_does_not_check_is_not_a_bearer_token() {
    let spec = entra_user(&[]);
    let bearer = sign_claims(&claims_with(&spec, json!({"typ": "Bearer"})));
    expect(
        &decide_op(&bearer, "inventory.list", json!({})),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    let accepting = compile_policy(&DEMO_POLICY.replacen(
        "    challenge: entra\n",
        "    challenge: entra\n    accept_bound_tokens: true\n",
        1,
    ));
    let canonical = thumbprint::encode(&[7; 32]);
    for (cnf, reason) in [
        (
            json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
            Reason::TokenTypeInvalid,
        ),
        (
            json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I", "x5t#S256": canonical}),
            Reason::TokenTypeInvalid,
        ),
        (json!({"jwk": {"kty": "OKP"}}), Reason::TokenTypeInvalid),
        (json!({}), Reason::TokenTypeInvalid),
        (
            json!({"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}),
            Reason::ClaimInvalid,
        ),
        (
            json!({"x5t#S256": format!("{canonical}=")}),
            Reason::ClaimInvalid,
        ),
        (json!({"x5t#S256": 5}), Reason::ClaimInvalid),
        (json!("x5t#S256"), Reason::ClaimInvalid),
    ] {
        let token = sign_claims(&claims_with(&spec, json!({ "cnf": cnf })));
        let d = decide_op(&token, "inventory.list", json!({}));
        expect(&d, Outcome::Deny, 401, reason);
        if reason == Reason::TokenTypeInvalid {
            assert!(d.message.contains("bound to a key"), "{cnf}: {}", d.message);
        }
        assert!(www(&d).contains("error=\"invalid_token\""), "{}", www(&d));
        let d = decide(
            &accepting,
            &op_request(&token, "inventory.list", json!({})),
            NOW,
        );
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
    }
}

/// A DER stand-in and its PEM as Envoy sends it (`attributes.source.certificate`: URL-encoded).
/// The thumbprint is of the bytes, whatever they are.
fn certificate(seed: u8) -> (Vec<u8>, String) {
    let der: Vec<u8> = (0..600u16).map(|i| (i as u8).wrapping_mul(seed)).collect();
    let body = STANDARD.encode(&der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let encoded: String = pem
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    (der, encoded)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn with_certificate(mut request: AccessRequest, certificate: ClientCertificate) -> AccessRequest {
    request.client_certificate = Some(certificate);
    request
}

/// RFC 8705 §3: a token whose `cnf.x5t#S256` names a client certificate is good only on a
/// request made with that certificate, however the proxy or the caller gives it, on every
/// request (the verified-token cache keeps the token, not the request's certificate), and on a
/// route open to anonymous callers too (a presented token is verified).
#[test]
fn a_certificate_bound_token_is_good_only_with_its_certificate() {
    let policy = demo_policy();
    let (der, pem) = certificate(3);
    let (other_der, other_pem) = certificate(5);
    let bound = sha256(&der);
    let token = sign_claims(&claims_with(
        &entra_user(&[]),
        json!({"cnf": {"x5t#S256": thumbprint::encode(&bound)}}),
    ));
    let op = || op_request(&token, "inventory.list", json!({}));
    for presented in [
        ClientCertificate::Der(der.clone()),
        ClientCertificate::UrlEncodedPem(pem.clone().into()),
        ClientCertificate::Thumbprint(bound),
    ] {
        let mut request = with_certificate(op(), presented.clone());
        request.explain = true;
        let d = decide(&policy, &request, NOW);
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
        assert_eq!(
            d.client_certificate.as_deref(),
            Some(&Ok(bound)),
            "{presented:?}"
        );
        assert!(
            d.explain
                .iter()
                .any(|s| s.stage == "binding" && s.detail.contains(&thumbprint::encode(&bound))),
            "{:?}",
            d.explain
        );
        // Envoy's other request: the cached token, another certificate.
        for (other, reason) in [
            (
                Some(ClientCertificate::Der(other_der.clone())),
                Reason::ClientCertificateMismatch,
            ),
            (
                Some(ClientCertificate::UrlEncodedPem(other_pem.clone().into())),
                Reason::ClientCertificateMismatch,
            ),
            (None, Reason::ClientCertificateMissing),
            (
                Some(ClientCertificate::UrlEncodedPem(
                    "not%20a%20certificate".into(),
                )),
                Reason::ClientCertificateInvalid,
            ),
            (
                Some(ClientCertificate::UrlEncodedPem(
                    format!("{pem}{pem}").into(),
                )),
                Reason::ClientCertificateInvalid,
            ),
        ] {
            let mut request = op();
            request.client_certificate = other.clone();
            let d = decide(&policy, &request, NOW);
            expect(&d, Outcome::Deny, 401, reason);
            assert!(www(&d).contains("error=\"invalid_token\""), "{}", www(&d));
            assert_eq!(d.rule, None, "no requirement is revealed: {other:?}");
            assert!(d.verified.is_some(), "the token itself is valid");
            assert!(
                reason.is_invalid_token(),
                "{reason:?} counts as a refused token"
            );
            if reason == Reason::ClientCertificateMismatch {
                assert_eq!(
                    d.client_certificate.as_deref(),
                    Some(&Ok(sha256(&other_der))),
                    "the record names the certificate presented"
                );
            }
        }
    }
    // Through Envoy's door, to the public health route: the token is still held to its binding.
    let health = || http_request(&bearer(&token), "GET", "/healthz");
    expect(
        &decide(&policy, &health(), NOW),
        Outcome::Deny,
        401,
        Reason::ClientCertificateMissing,
    );
    expect(
        &decide(
            &policy,
            &with_certificate(
                health(),
                ClientCertificate::UrlEncodedPem(pem.clone().into()),
            ),
            NOW,
        ),
        Outcome::Allow,
        200,
        Reason::AnonymousAllowed,
    );
    // A bearer token ignores a certificate, and never reads it (a malformed one does not matter).
    let bearer_token = rs256(&entra_user(&[]));
    let d = decide(
        &policy,
        &with_certificate(
            op_request(&bearer_token, "inventory.list", json!({})),
            ClientCertificate::UrlEncodedPem("garbage".into()),
        ),
        NOW,
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(d.client_certificate, None);
    // An issuer whose proxy checks the binding: the token passes as a bearer token.
    let accepting = compile_policy(&DEMO_POLICY.replacen(
        "    challenge: entra\n",
        "    challenge: entra\n    accept_bound_tokens: true\n",
        1,
    ));
    expect(
        &decide(&accepting, &op(), NOW),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
}

/// `require: { certificate_bound: true }` (FAPI 2.0's sender-constrained tokens): a bearer token
/// is refused before anything else the rule asks is revealed, in a rule and in an escalation; a
/// token whose binding the proxy checks (`accept_bound_tokens`) does not meet it.
#[test]
fn a_rule_may_take_only_certificate_bound_tokens() {
    let rules = concat!(
        "  - id: fapi\n",
        "    match: { operation: fapi.pay }\n",
        "    require: { certificate_bound: true, scopes: [never.granted] }\n",
        "  - id: large-pay\n",
        "    match: { operation: fapi.maybe }\n",
        "    escalate:\n",
        "      - when: 'request.attributes.amount > 100'\n",
        "        require: { certificate_bound: true }\n",
    );
    let policy = with_rules(rules);
    let (der, _) = certificate(9);
    let bound = sha256(&der);
    let spec = entra_user(&[]);
    let bearer_token = rs256(&spec);
    let bound_token = sign_claims(&claims_with(
        &spec,
        json!({"cnf": {"x5t#S256": thumbprint::encode(&bound)}}),
    ));
    let d = decide(
        &policy,
        &with_certificate(
            op_request(&bearer_token, "fapi.pay", json!({})),
            ClientCertificate::Der(der.clone()),
        ),
        NOW,
    );
    expect(&d, Outcome::Deny, 401, Reason::TokenNotBound);
    assert_eq!(rule(&d), Some("fapi"));
    assert!(www(&d).contains("error=\"invalid_token\""), "{}", www(&d));
    assert!(!d.message.contains("never.granted"), "{}", d.message);
    // Bound and presented: on to the rule's next requirement.
    let d = decide(
        &policy,
        &with_certificate(
            op_request(&bound_token, "fapi.pay", json!({})),
            ClientCertificate::Der(der.clone()),
        ),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::MissingScope);
    // The escalation asks for it only when its condition holds.
    let maybe = |token: &str, amount: i64| {
        decide(
            &policy,
            &with_certificate(
                op_request(token, "fapi.maybe", json!({ "amount": amount })),
                ClientCertificate::Der(der.clone()),
            ),
            NOW,
        )
    };
    expect(
        &maybe(&bearer_token, 5),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    expect(
        &maybe(&bearer_token, 500),
        Outcome::Deny,
        401,
        Reason::TokenNotBound,
    );
    expect(
        &maybe(&bound_token, 500),
        Outcome::Allow,
        200,
        Reason::Allowed,
    );
    let accepting = compile_policy(
        &DEMO_POLICY
            .replacen(
                "    challenge: entra\n",
                "    challenge: entra\n    accept_bound_tokens: true\n",
                1,
            )
            .replace(
                "  - id: everything-else\n",
                &format!("{rules}  - id: everything-else\n"),
            ),
    );
    expect(
        &decide(
            &accepting,
            &with_certificate(
                op_request(&bound_token, "fapi.maybe", json!({ "amount": 500 })),
                ClientCertificate::Der(der),
            ),
            NOW,
        ),
        Outcome::Deny,
        401,
        Reason::TokenNotBound,
    );
}

/// The client is read from `azp` (Entra v2, OIDC), `appid` (Entra v1), `client_id` (RFC 9068)
/// or `cid` (Okta), in that order.
#[test]
fn the_client_id_is_read_from_each_providers_claim() {
    let spec = TokenSpec {
        client_id: None,
        ..entra_user(&[])
    };
    for (claims, client) in [
        (
            json!({"azp": "a", "appid": "b", "client_id": "c", "cid": "d"}),
            Some("a"),
        ),
        (
            json!({"appid": "b", "client_id": "c", "cid": "d"}),
            Some("b"),
        ),
        (json!({"client_id": "c", "cid": "d"}), Some("c")),
        (json!({"cid": "d"}), Some("d")),
        (json!({}), None),
    ] {
        let d = decide_op(
            &sign_claims(&claims_with(&spec, claims.clone())),
            "inventory.list",
            json!({}),
        );
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
        let principal = d.principal.as_ref().expect("a principal");
        assert_eq!(principal.client_id.as_deref(), client, "{claims}");
    }
    // Another provider's `cid` of another kind is no client id, and no reason to refuse.
    let d = decide_op(
        &sign_claims(&claims_with(&spec, json!({"cid": 7}))),
        "inventory.list",
        json!({}),
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(d.principal.as_ref().unwrap().client_id, None);
}

/// Entra's `sub` is pairwise (one per client application); with `subject_claim: oid` the subject
/// is the user's object id, the same whichever client asked for the token, and a token without
/// one is refused.
#[test]
fn the_subject_is_the_claim_the_issuer_names() {
    let by_oid = compile_policy(&DEMO_POLICY.replacen(
        "    challenge: entra\n",
        "    challenge: entra\n    subject_claim: oid\n",
        1,
    ));
    let oid = "00000000-0000-0000-66f3-3332eca7ea81";
    let subject = |policy: &Policy, claims: Value| {
        let token = sign_claims(&claims_with(&entra_user(&[]), claims));
        let d = decide(
            policy,
            &op_request(&token, "inventory.list", json!({})),
            NOW,
        );
        (
            d.outcome,
            d.reason,
            d.principal.map(|p| p.subject.to_string()),
        )
    };
    for pairwise in [
        "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        "bbbb-other-client",
    ] {
        let claims = json!({"sub": pairwise, "oid": oid});
        assert_eq!(
            subject(&by_oid, claims.clone()),
            (Outcome::Allow, Reason::Allowed, Some(oid.to_owned()))
        );
        assert_eq!(
            subject(&demo_policy(), claims),
            (Outcome::Allow, Reason::Allowed, Some(pairwise.to_owned())),
            "sub by default"
        );
    }
    for claims in [json!({"oid": null}), json!({"oid": ""}), json!({"oid": 7})] {
        let (outcome, reason, _) = subject(&by_oid, claims.clone());
        assert_eq!(
            (outcome, reason),
            (Outcome::Deny, Reason::ClaimInvalid),
            "{claims}"
        );
        // The default reads no oid: any of these is no reason to refuse.
        let (outcome, _, _) = subject(&demo_policy(), claims.clone());
        assert_eq!(outcome, Outcome::Allow, "{claims}");
    }
}

/// Every token accepted can be blocked by what it names: a subject, client or token id longer
/// than a block holds is refused at verification, one as long is accepted, and a block of it
/// can be set.
#[test]
fn a_claim_too_long_to_block_by_refuses_the_token() {
    use crate::risk::blocks::{Kind, MAX_BLOCKED_VALUE_BYTES, normalize};
    let by_oid = compile_policy(&DEMO_POLICY.replacen(
        "    challenge: entra\n",
        "    challenge: entra\n    subject_claim: oid\n",
        1,
    ));
    let decided = |policy: &Policy, claims: Value| {
        let token = sign_claims(&claims_with(&entra_user(&[]), claims));
        let d = decide(
            policy,
            &op_request(&token, "inventory.list", json!({})),
            NOW,
        );
        (d.outcome, d.reason)
    };
    /// A claim, the kind of block that holds it, the policy reading it, and its claims.
    type Case<'p> = (&'static str, Kind, &'p Policy, fn(&str) -> Value);
    let cases: [Case; 8] = [
        ("sub", Kind::Subject, &demo_policy(), |v| json!({"sub": v})),
        ("oid", Kind::Subject, &by_oid, |v| json!({"oid": v})),
        ("azp", Kind::ClientId, &demo_policy(), |v| json!({"azp": v})),
        (
            "appid",
            Kind::ClientId,
            &demo_policy(),
            |v| json!({"azp": null, "appid": v}),
        ),
        (
            "client_id",
            Kind::ClientId,
            &demo_policy(),
            |v| json!({"azp": null, "appid": null, "client_id": v}),
        ),
        (
            "cid",
            Kind::ClientId,
            &demo_policy(),
            |v| json!({"azp": null, "appid": null, "client_id": null, "cid": v}),
        ),
        ("jti", Kind::TokenId, &demo_policy(), |v| json!({"jti": v})),
        (
            "uti",
            Kind::TokenId,
            &demo_policy(),
            |v| json!({"jti": null, "uti": v}),
        ),
    ];
    for (claim, kind, policy, claims) in cases {
        let longest = "m".repeat(MAX_BLOCKED_VALUE_BYTES);
        assert_eq!(
            decided(policy, claims(&longest)),
            (Outcome::Allow, Reason::Allowed),
            "{claim} of {MAX_BLOCKED_VALUE_BYTES} bytes"
        );
        assert!(normalize(kind, &longest).is_ok(), "{claim}: blockable");
        let longer = "m".repeat(MAX_BLOCKED_VALUE_BYTES + 1);
        assert_eq!(
            decided(policy, claims(&longer)),
            (Outcome::Deny, Reason::ClaimInvalid),
            "{claim} of {} bytes",
            MAX_BLOCKED_VALUE_BYTES + 1
        );
        assert!(normalize(kind, &longer).is_err(), "{claim}: not blockable");
    }
}

#[test]
fn oversized_token_is_refused_before_parsing() {
    let mut spec = entra_user(&[]);
    spec.extra
        .insert("padding".into(), json!("x".repeat(17 * 1024)));
    let token = rs256(&spec);
    assert!(token.len() > 16 * 1024);
    expect_invalid(&token, Reason::TokenTooLarge);
    expect_invalid(&"a".repeat(16 * 1024 + 1), Reason::TokenTooLarge);
}

#[test]
fn tampered_payload_fails_the_signature_check() {
    let token = rs256(&entra_user(&[]));
    let parts: Vec<&str> = token.split('.').collect();
    let escalated = b64_json(&entra_user(&["c1", "c2", "c3"]).claims(NOW));
    expect_invalid(
        &format!("{}.{escalated}.{}", parts[0], parts[2]),
        Reason::SignatureInvalid,
    );
    // A signature from another token of the same key does not transfer either.
    let other = rs256(&oidc_admin());
    let other_signature = other.rsplit('.').next().unwrap();
    expect_invalid(
        &format!("{}.{}.{other_signature}", parts[0], parts[1]),
        Reason::SignatureInvalid,
    );
}

#[test]
fn claims_of_the_wrong_json_type_are_claim_invalid() {
    let spec = entra_user(&["c1"]);
    let cases = [
        json!({"exp": "1800003600"}),
        json!({"exp": null}),
        json!({"nbf": "soon"}),
        json!({"acrs": 1}),
        json!({"aud": 42}),
        json!({"aud": [DEMO_AUDIENCE, 42]}),
        json!({"scp": 5}),
        json!({"roles": [1, 2]}),
        json!({"xms_cc": {"cp1": true}}),
        json!({"auth_time": "yesterday"}),
        json!({"sub": 12345}),
    ];
    for changes in cases {
        let token = sign_claims(&claims_with(&spec, changes.clone()));
        let d = decide_token(&token);
        assert_eq!(
            (d.outcome, d.http_status, d.reason),
            (Outcome::Deny, 401, Reason::ClaimInvalid),
            "{changes}: {d:#?}"
        );
    }
}

#[test]
fn time_claims_out_of_range_are_claim_invalid() {
    let spec = entra_user(&["c1"]);
    for changes in [
        json!({"auth_time": i64::MIN}),
        json!({"auth_time": -9_000_000_000_000_000_000_i64}),
        json!({"auth_time": -1}),
        json!({"auth_time": -1e300}),
        json!({"auth_time": 1e300}),
        json!({"exp": 253_402_300_800_i64}),
        json!({"exp": u64::MAX}),
        json!({"exp": 1e19}),
        json!({"nbf": -5}),
    ] {
        let token = sign_claims(&claims_with(&spec, changes.clone()));
        // The wire transfer demands a sign-in within 15 minutes: an age is computed.
        let d = decide_op(&token, "payments.wire_transfer", json!({}));
        expect(&d, Outcome::Deny, 401, Reason::ClaimInvalid);
        let claim = changes.as_object().unwrap().keys().next().unwrap();
        assert!(
            d.message.contains(&format!(
                "{claim:?} is missing, of the wrong type or out of range"
            )),
            "{changes}: {}",
            d.message
        );
    }
    // Fractions and the edges of the range are fine.
    for changes in [json!({"auth_time": NOW as f64 - 30.5}), json!({"nbf": 0})] {
        let token = sign_claims(&claims_with(&spec, changes.clone()));
        let d = decide_op(&token, "payments.wire_transfer", json!({}));
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
    }
}

#[test]
fn es256_demo_key_verifies_an_es256_token() {
    let d = decide_op(
        &es256(&entra_user(&["c1"])),
        "payments.wire_transfer",
        json!({}),
    );
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    let d = decide_op(
        &es256(&entra_user(&[])),
        "payments.wire_transfer",
        json!({}),
    );
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
}

#[test]
fn token_whose_kid_names_a_key_of_another_type_is_key_mismatch() {
    let claims = entra_user(&["c1"]).claims(NOW);
    let rs256_under_ec_kid = demo::sign(
        &claims,
        &demo_file("demo-rsa-private.pem"),
        Algorithm::RS256,
        DEMO_EC_KID,
    )
    .unwrap();
    expect_invalid(&rs256_under_ec_kid, Reason::KeyMismatch);
    let es256_under_rsa_kid = demo::sign(
        &claims,
        &demo_file("demo-ec-private.pem"),
        Algorithm::ES256,
        DEMO_RSA_KID,
    )
    .unwrap();
    expect_invalid(&es256_under_rsa_kid, Reason::KeyMismatch);
    // The RSA key is published with alg RS256: PS256 under it is refused even though the key fits.
    let ps256 = sign_raw(
        &json!({"alg": "PS256", "kid": DEMO_RSA_KID}),
        &claims,
        &rsa_key(),
        Algorithm::PS256,
    );
    let d = decide_token(&ps256);
    assert_eq!((d.outcome, d.http_status), (Outcome::Deny, 401), "{d:#?}");
    assert!(
        matches!(d.reason, Reason::AlgorithmNotAllowed | Reason::KeyMismatch),
        "{d:#?}"
    );
}

/// Entra's key sets, the tenant's own included, publish each key with the issuer
/// `https://login.microsoftonline.com/{tenantid}/v2.0`: an exact (single-tenant) issuer fills the
/// template with the token's `tid`, as Microsoft's validation does, and still refuses a key whose
/// issuer, so filled, is not the token's.
#[test]
fn a_templated_key_issuer_takes_the_tokens_tid_under_an_exact_issuer() {
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const OTHER: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";
    let exact = format!("https://login.microsoftonline.com/{TENANT}/v2.0");
    let policy = compile_policy(&DEMO_POLICY.replace(DEMO_ENTRA_ISSUER, &exact));
    let key_set = |key_issuer: &str| {
        let mut jwks: Value = serde_json::from_slice(&demo_file("jwks.json")).unwrap();
        for key in jwks["keys"].as_array_mut().unwrap() {
            key["issuer"] = Value::from(key_issuer);
        }
        crate::identity::jwks::KeySet::parse(jwks.to_string().as_bytes())
            .unwrap()
            .0
    };
    let token = |tid: Option<&str>| {
        rs256(&TokenSpec {
            issuer: exact.clone(),
            tenant: tid.map(str::to_owned),
            ..entra_user(&["c1"])
        })
    };
    let decide_under = |key_issuer: &str, tid: Option<&str>| {
        for issuer in policy.issuers.iter() {
            issuer.set_keys(key_set(key_issuer));
        }
        let request = op_request(&token(tid), "payments.wire_transfer", json!({}));
        decide(&policy, &request, NOW)
    };
    let template = "https://login.microsoftonline.com/{tenantid}/v2.0";
    let d = decide_under(template, Some(TENANT));
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    let d = decide_under(&exact, Some(TENANT));
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
    for (key_issuer, tid) in [
        (template, Some(OTHER)),
        (template, None),
        (template, Some("not-a-guid")),
        (
            &format!("https://login.microsoftonline.com/{OTHER}/v2.0"),
            Some(TENANT),
        ),
    ] {
        let d = decide_under(key_issuer, tid);
        expect(&d, Outcome::Deny, 401, Reason::KeyMismatch);
    }
}

/// `admin.audiences` names the admin API's audience: a token meant for it alone is refused by
/// the data plane (an operator's admin token is no API token), one meant for the API too is not.
#[test]
fn a_token_meant_for_the_admin_api_alone_is_refused_by_the_data_plane() {
    const ADMIN_API: &str = "api://stepgate-admin";
    let text = DEMO_POLICY.replacen(
        &format!("audiences: [{DEMO_AUDIENCE}]"),
        &format!("audiences: [{DEMO_AUDIENCE}, {ADMIN_API}]"),
        1,
    ) + &format!(
        "\nadmin:\n  issuers: [demo-entra]\n  roles: [StepgateAdmin]\n  audiences: [{ADMIN_API}]\n"
    );
    let policy = compile_policy(&text);
    let decide_with = |audience: Value| {
        let claims = claims_with(&entra_user(&["c1"]), json!({ "aud": audience }));
        let request = op_request(&sign_claims(&claims), "payments.wire_transfer", json!({}));
        decide(&policy, &request, NOW)
    };
    for audience in [json!(ADMIN_API), json!([ADMIN_API])] {
        let d = decide_with(audience.clone());
        expect(&d, Outcome::Deny, 401, Reason::AudienceMismatch);
        assert!(d.message.contains("admin API"), "{audience}: {}", d.message);
        assert!(d.principal.is_none(), "{audience}");
    }
    for audience in [json!(DEMO_AUDIENCE), json!([ADMIN_API, DEMO_AUDIENCE])] {
        let d = decide_with(audience.clone());
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
    }
    // Without admin.audiences every audience of the issuer is the data plane's.
    let d = {
        let policy = compile_policy(&DEMO_POLICY.replacen(
            &format!("audiences: [{DEMO_AUDIENCE}]"),
            &format!("audiences: [{DEMO_AUDIENCE}, {ADMIN_API}]"),
            1,
        ));
        let claims = claims_with(&entra_user(&["c1"]), json!({ "aud": ADMIN_API }));
        decide(
            &policy,
            &op_request(&sign_claims(&claims), "payments.wire_transfer", json!({})),
            NOW,
        )
    };
    expect(&d, Outcome::Allow, 200, Reason::Allowed);
}

#[test]
fn fingerprint_names_the_presented_token_without_revealing_it() {
    let token = rs256(&entra_user(&["c1"]));
    let d = decide_token(&token);
    let fp = d
        .token_fingerprint
        .as_deref()
        .expect("a fingerprint for a presented token");
    assert_eq!(fp, crate::identity::fingerprint(&token));
    assert!(fp.len() == 12 && fp.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(
        !format!("{d:?}").contains(&token),
        "the raw token never appears in a decision"
    );
}

/// `admin.require` is held to a rule's requirement, but not to the risk signals: a count that
/// anyone holding a token of an operator's subject can raise must not lock the operators out of
/// the admin API, while it still raises what the API asks of that subject.
#[test]
fn risk_signals_do_not_reach_the_admin_apis_own_requirement() {
    let text = DEMO_POLICY.replace(
        "      threshold: 10\n      action: log                        # then: action: step_up, require: { auth_contexts: [c3] }",
        "      threshold: 1\n      action: step_up\n      require: { auth_contexts: [c3] }",
    ) + "\nadmin:\n  issuers: [demo-oidc]\n  roles: [Admin]\n  require: { amr: [mfa] }\n";
    assert_ne!(
        text,
        format!(
            "{DEMO_POLICY}\nadmin:\n  issuers: [demo-oidc]\n  roles: [Admin]\n  require: {{ amr: [mfa] }}\n"
        ),
        "the signal was made to enforce"
    );
    let policy = compile_policy(&text);
    let admin_rule = policy.admin.rule.as_ref().expect("admin.require compiled");

    // The operator's subject is prompted once: the signal now asks its API requests for c3.
    let prompted = TokenSpec {
        subject: "bob".to_owned(),
        ..entra_user(&[])
    };
    let request = op_request(&rs256(&prompted), "payments.wire_transfer", json!({}));
    let step_up = decide(&policy, &request, NOW);
    assert_eq!(step_up.outcome, Outcome::StepUp, "{step_up:#?}");
    policy
        .risk
        .record(&request, &step_up, NOW * 1000, |_, _, _| {});
    let with_c1 = TokenSpec {
        subject: "bob".to_owned(),
        ..entra_user(&["c1"])
    };
    let raised = decide(
        &policy,
        &op_request(&rs256(&with_c1), "payments.wire_transfer", json!({})),
        NOW,
    );
    assert_eq!(
        raised.outcome,
        Outcome::StepUp,
        "the signal is in force: {raised:#?}"
    );

    // The operator's admin token meets admin.require all the same.
    let admin = decide(
        &policy,
        &op_request(&rs256(&oidc_admin()), "reports.read", json!({})),
        NOW,
    );
    let token = admin.verified.expect("the admin token verifies");
    assert_eq!(token.principal.subject.as_ref(), "bob");
    let d = super::decide_token(&policy, admin_rule, &token, None, NOW);
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::Allow, Reason::Allowed),
        "{d:#?}"
    );
    // And is still held to it.
    let password_only = TokenSpec {
        amr: strings(&["pwd"]),
        ..oidc_admin()
    };
    let weak = decide(
        &policy,
        &op_request(&rs256(&password_only), "reports.read", json!({})),
        NOW,
    );
    let d = super::decide_token(&policy, admin_rule, &weak.verified.unwrap(), None, NOW);
    // An `amr` alone is no RFC 9470 challenge: refused, naming the method.
    assert_eq!(
        (d.outcome, d.reason),
        (Outcome::Deny, Reason::StepUpNotExpressible),
        "{d:#?}"
    );
    assert!(d.message.contains("mfa"), "{}", d.message);
}

/// The other valid ECDSA signature of a P-256 token: `(r, s)` made `(r, n − s)`, worked out here
/// byte by byte, apart from the code under test.
fn other_p256_signature(token: &str) -> String {
    const N: [u8; 32] = [
        0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF, 0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63,
        0x25, 0x51,
    ];
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let mut signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
    assert_eq!(signature.len(), 64);
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut digit = i16::from(N[i]) - i16::from(signature[32 + i]) - borrow;
        borrow = i16::from(digit < 0);
        digit += 256 * borrow;
        signature[32 + i] = digit as u8;
    }
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Anyone holding an ECDSA token can spell its signature a second way that verifies: both
/// spellings get one fingerprint (the lower `s`'s), so a block of it holds for both.
#[test]
fn an_ecdsa_token_and_its_twin_signature_share_one_fingerprint() {
    let token = es256(&entra_user(&["c1"]));
    let twin = other_p256_signature(&token);
    assert_ne!(token, twin);
    let (first, second) = (decide_token(&token), decide_token(&twin));
    assert_eq!(first.outcome, Outcome::Allow, "{first:#?}");
    assert_eq!(
        second.outcome,
        Outcome::Allow,
        "the twin verifies too: {second:#?}"
    );
    let fingerprint = first.token_fingerprint.clone().expect("a fingerprint");
    assert_eq!(second.token_fingerprint.as_deref(), Some(&*fingerprint));
    assert!(
        [
            crate::identity::fingerprint(&token),
            crate::identity::fingerprint(&twin)
        ]
        .contains(&fingerprint),
        "the SHA-256 of one of the two spellings"
    );
}

#[test]
fn a_block_of_an_ecdsa_tokens_fingerprint_holds_for_its_twin() {
    use crate::{
        risk::blocks::{Block, Kind},
        server::authorizer::{Authorizer, unix_now},
    };
    let now = unix_now();
    let token = demo::sign(
        &entra_user(&["c1"]).claims(now),
        &demo_file("demo-ec-private.pem"),
        Algorithm::ES256,
        DEMO_EC_KID,
    )
    .unwrap();
    let twin = other_p256_signature(&token);
    let authorizer = Authorizer::new(Arc::new(demo_policy()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ask = |token: &str| {
        let request = op_request(token, "payments.wire_transfer", json!({}));
        runtime
            .block_on(authorizer.decide(&request, crate::request::Door::Decide))
            .0
    };
    let fingerprint = ask(&token).token_fingerprint.expect("a fingerprint");
    let block = Block {
        kind: Kind::Token,
        value: fingerprint,
        reason_id: "stolen".into(),
        reason: "a stolen token".into(),
        created_at: now,
        expires_at: now + 3600,
        created_by: "test".into(),
    };
    authorizer.risk().set_block(block, now).unwrap();
    for spelling in [&token, &twin] {
        let decision = ask(spelling);
        assert_eq!(
            (decision.outcome, decision.reason),
            (Outcome::Deny, Reason::Blocked),
            "{decision:#?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Token type and authentication time
// ---------------------------------------------------------------------------------------------

#[test]
fn access_token_types_are_accepted_and_other_jwt_types_refused() {
    let claims = entra_user(&["c1"]).claims(NOW);
    for typ in ["JWT", "at+jwt", "application/at+JWT", "jwt"] {
        let header = json!({"alg": "RS256", "kid": DEMO_RSA_KID, "typ": typ});
        let d = decide_token(&sign_raw(&header, &claims, &rsa_key(), Algorithm::RS256));
        assert_eq!(d.outcome, Outcome::Allow, "typ {typ}: {:?}", d.reason);
    }
    for typ in ["logout+jwt", "dpop+jwt", "secevent+jwt"] {
        let header = json!({"alg": "RS256", "kid": DEMO_RSA_KID, "typ": typ});
        let d = decide_token(&sign_raw(&header, &claims, &rsa_key(), Algorithm::RS256));
        expect(&d, Outcome::Deny, 401, Reason::TokenTypeInvalid);
    }
}

#[test]
fn an_issuer_requiring_at_jwt_refuses_every_other_type_and_none() {
    let policy = compile_policy(&DEMO_POLICY.replace(
        "    challenge: entra\n",
        "    challenge: entra\n    require_at_jwt: true\n",
    ));
    let claims = entra_user(&["c1"]).claims(NOW);
    let signed = |header: Value| sign_raw(&header, &claims, &rsa_key(), Algorithm::RS256);
    let decide_with = |token: &str| {
        decide(
            &policy,
            &op_request(token, "inventory.list", json!({})),
            NOW,
        )
    };
    for typ in ["at+jwt", "application/AT+JWT"] {
        let d = decide_with(&signed(
            json!({"alg": "RS256", "kid": DEMO_RSA_KID, "typ": typ}),
        ));
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
    }
    // An ID token without nonce or hashes looks like an access token but for its `typ`.
    for header in [
        json!({"alg": "RS256", "kid": DEMO_RSA_KID}),
        json!({"alg": "RS256", "kid": DEMO_RSA_KID, "typ": "JWT"}),
    ] {
        let d = decide_with(&signed(header.clone()));
        expect(&d, Outcome::Deny, 401, Reason::TokenTypeInvalid);
        assert!(
            d.message.contains("none") || d.message.contains("JWT"),
            "{header}: {}",
            d.message
        );
    }
}

#[test]
fn auth_time_in_the_future_makes_the_token_invalid() {
    let spec = TokenSpec {
        auth_age: Some(-3600),
        ..entra_user(&["c1"])
    };
    let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
    expect(&d, Outcome::Deny, 401, Reason::ClaimInvalid);
    // Within the leeway it is a clock difference, not a forgery.
    let spec = TokenSpec {
        auth_age: Some(-30),
        ..entra_user(&["c1"])
    };
    let d = decide_op(&rs256(&spec), "payments.wire_transfer", json!({}));
    assert_eq!(d.outcome, Outcome::Allow, "{:?}", d.reason);
}

#[test]
fn entra_token_with_contexts_but_weak_acr_is_refused_not_challenged_in_a_loop() {
    let yaml = r#"
realm: inline
issuers:
  - id: entra
    issuer: https://login.demo.stepgate.invalid/entra/v2.0
    jwks_file: demo-keys/jwks.json
    audiences: [api://stepgate-demo]
    challenge: entra
auth_contexts:
  c1: { description: MFA }
rules:
  - id: strong
    match: { operation: "*" }
    require: { auth_contexts: [c1], amr: [hwk] }
"#;
    let policy = compile_policy(yaml);
    let token = rs256(&entra_user(&["c1"]));
    let d = decide(&policy, &op_request(&token, "x", json!({})), NOW);
    expect(&d, Outcome::Deny, 403, Reason::StepUpNotExpressible);
    assert!(d.www_authenticate.is_none());
}

#[test]
fn rules_cannot_be_bypassed_by_case_path_parameters_or_control_characters() {
    let token = bearer(&rs256(&entra_user(&[])));
    let request = http_request(&token, "POST", "/PAYMENTS/wire");
    let d = decide(&with_path_case("insensitive"), &request, NOW);
    assert_eq!(rule(&d), Some("wire-transfer"));
    expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    let d = decide(&demo_policy(), &request, NOW);
    expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
    for target in [
        "/payments/wire;jsessionid=1",
        "/payments;x=1/wire",
        "/x/..;/payments/wire",
        "/payments/wire%00",
    ] {
        let d = decide_http(&token, "POST", target);
        expect(&d, Outcome::Deny, 400, Reason::InvalidPath);
    }
    // An upstream that is a servlet container cuts the parameters, and so do the rules; what it
    // would read as `..` is still refused.
    let strip = compile_policy(&DEMO_POLICY.replacen(
        "remove_authorization: false",
        "remove_authorization: false\n  path_parameters: strip",
        1,
    ));
    for target in ["/payments/wire;jsessionid=1", "/payments;x=1/wire"] {
        let d = decide(&strip, &http_request(&token, "POST", target), NOW);
        assert_eq!(rule(&d), Some("wire-transfer"), "{target}");
        expect(&d, Outcome::StepUp, 401, Reason::MissingAuthContext);
    }
    for target in ["/x/..;/payments/wire", "/x/;/payments/wire"] {
        let d = decide(&strip, &http_request(&token, "POST", target), NOW);
        expect(&d, Outcome::Deny, 400, Reason::InvalidPath);
    }
}

/// An IPv6 host written as Envoy's virtual hosts write it, in brackets, names that host: the
/// rule is not silently dead while the catch-all decides.
#[test]
fn a_bracketed_ipv6_host_pattern_matches_its_host() {
    let policy = with_first_rule(
        "  - id: ipv6-admin\n    match: { hosts: [\"[2001:db8::1]\", \"[::1]:8443\"] }\n    require: { roles: [Admin] }",
        "",
    );
    let token = bearer(&rs256(&entra_user(&["c1"])));
    for authority in ["[2001:db8::1]", "[2001:DB8::1]", "[::1]:8443"] {
        let request = AccessRequest {
            http: Some(HttpAttributes::new(
                "GET",
                authority,
                "/x",
                Headers::default(),
            )),
            ..http_request(&token, "GET", "/x")
        };
        let d = decide(&policy, &request, NOW);
        assert_eq!(rule(&d), Some("ipv6-admin"), "{authority}: {d:#?}");
        expect(&d, Outcome::Deny, 403, Reason::MissingRole);
    }
}

/// Envoy picks its virtual host with the port and trailing dot as sent: `admin.example.com:8443`
/// is not `admin.example.com` to it. A host rule matching such a host only without them decides
/// nothing (`400 ambiguous_host`), unless it names the host as sent or the policy says the proxy
/// ignores ports.
#[test]
fn a_host_with_a_port_or_a_trailing_dot_is_read_as_the_proxy_routes_it() {
    let with_host_rule = |hosts: &str, upstream: &str| {
        with_first_rule(
            &format!(
                "  - id: admin-host\n    match: {{ hosts: {hosts} }}\n    require: {{ roles: [Admin] }}"
            ),
            upstream,
        )
    };
    let token = bearer(&rs256(&entra_user(&["c1"])));
    let on_host = |policy: &Policy, authorization: &str, host: &str| {
        let request = AccessRequest {
            http: Some(HttpAttributes::new("GET", host, "/x", Headers::default())),
            ..http_request(authorization, "GET", "/x")
        };
        decide(policy, &request, NOW)
    };
    let taken = |d: &Decision, host: &str| {
        assert_eq!(rule(d), Some("admin-host"), "{host}: {}", d.message);
        expect(d, Outcome::Deny, 403, Reason::MissingRole);
    };
    let ambiguous = |d: &Decision, host: &str| {
        assert_eq!(d.reason, Reason::AmbiguousHost, "{host}: {}", d.message);
        expect(d, Outcome::Deny, 400, Reason::AmbiguousHost);
        assert!(www(d).contains("invalid_request"), "{host}");
    };

    let policy = with_host_rule("[admin.example.com]", "");
    for host in ["admin.example.com", "Admin.Example.COM"] {
        taken(&on_host(&policy, &token, host), host);
    }
    for host in [
        "admin.example.com:8443",
        "Admin.Example.COM.",
        "admin.example.com.:8443",
    ] {
        let d = on_host(&policy, &token, host);
        ambiguous(&d, host);
        assert_eq!(
            rule(&d),
            Some("admin-host"),
            "named to a caller with a valid token"
        );
        let anonymous = on_host(&policy, "", host);
        ambiguous(&anonymous, host);
        assert_eq!(rule(&anonymous), None, "named to no anonymous caller");
    }
    // Hosts no host rule matches on either reading go on to the other rules.
    let d = on_host(&policy, &token, "api.example.com:8443");
    assert_eq!(rule(&d), Some("everything-else"), "{}", d.message);

    // Named as sent, they match; `:*` is any port (and only a host with one).
    let policy = with_host_rule(
        r#"[admin.example.com, "admin.example.com:8443", admin.example.com., "ops.example.com:*"]"#,
        "",
    );
    for host in [
        "admin.example.com:8443",
        "admin.example.com.",
        "ops.example.com:9000",
    ] {
        taken(&on_host(&policy, &token, host), host);
    }
    ambiguous(
        &on_host(&policy, &token, "admin.example.com.:8443"),
        "dot and port",
    );
    let d = on_host(&policy, &token, "ops.example.com");
    assert_eq!(rule(&d), Some("everything-else"), "{}", d.message);

    // A proxy that ignores ports routes the host without its port, but with its dot (Envoy's
    // `ignore_port_in_host_matching`; only `strip_trailing_host_dot` drops the dot, and then
    // stepgate never sees it).
    let policy = with_host_rule("[admin.example.com]", "  host_port: ignored\n");
    for host in ["admin.example.com", "admin.example.com:8443", "[::1]:80"] {
        let d = on_host(&policy, &token, host);
        if host.starts_with('[') {
            assert_eq!(rule(&d), Some("everything-else"), "{}", d.message);
        } else {
            taken(&d, host);
        }
    }
    for host in ["Admin.Example.COM.", "admin.example.com.:8443"] {
        ambiguous(&on_host(&policy, &token, host), host);
    }
    let policy = with_host_rule(
        "[admin.example.com, admin.example.com.]",
        "  host_port: ignored\n",
    );
    for host in ["Admin.Example.COM.", "admin.example.com.:8443"] {
        taken(&on_host(&policy, &token, host), host);
    }
}

/// A weaker rule for one host above a stricter catch-all (a public site beside an API): Envoy
/// serves `www.example.com:8443` from its `*` virtual host, the API, so the public rule must not
/// let an anonymous caller through with it.
#[test]
fn a_port_on_a_public_host_does_not_open_the_api_behind_the_proxys_other_virtual_host() {
    let policy = with_first_rule(
        "  - id: www-public\n    match: { hosts: [www.example.com] }\n    allow_anonymous: true",
        "",
    );
    let anonymous = |host: &str| {
        let request = AccessRequest {
            http: Some(HttpAttributes::new(
                "GET",
                host,
                "/admin/users",
                Headers::default(),
            )),
            ..http_request("", "GET", "/admin/users")
        };
        decide(&policy, &request, NOW)
    };
    let d = anonymous("www.example.com");
    assert_eq!(
        (d.outcome, d.reason, rule(&d)),
        (Outcome::Allow, Reason::AnonymousAllowed, Some("www-public"))
    );
    for host in ["www.example.com:8443", "www.example.com."] {
        let d = anonymous(host);
        expect(&d, Outcome::Deny, 400, Reason::AmbiguousHost);
    }
}

#[test]
fn allowed_request_that_would_overflow_the_proxy_header_limit_gets_431() {
    let policy = demo_policy();
    let token = bearer(&rs256(&entra_user(&["c1"])));
    let with_count = |count: usize| AccessRequest {
        proxy_header_count: Some(count),
        ..http_request(&token, "GET", "/accounts")
    };
    // subject, tenant, auth contexts and rule: four identity headers are added.
    let d = decide(&policy, &with_count(96), NOW);
    assert_eq!(d.outcome, Outcome::Allow, "96 + 4 fits a limit of 100");
    let d = decide(&policy, &with_count(97), NOW);
    expect(&d, Outcome::Deny, 431, Reason::TooManyHeaders);
    assert!(d.identity_headers.is_empty());
    // Denials add nothing, and Decide calls carry no count.
    let anonymous = AccessRequest {
        proxy_header_count: Some(99),
        ..http_request("", "GET", "/accounts")
    };
    expect(
        &decide(&policy, &anonymous, NOW),
        Outcome::Deny,
        401,
        Reason::TokenMissing,
    );
    assert_eq!(
        decide(&policy, &http_request(&token, "GET", "/accounts"), NOW).outcome,
        Outcome::Allow
    );
}

#[test]
fn cached_tokens_keep_only_the_claims_the_policy_reads() {
    // The demo policy reads nothing beyond the principal.
    assert_eq!(
        demo_policy().token_cache.keeps(),
        &KeepClaims::Named(Box::new([]))
    );
    // CEL may read any claim.
    assert_eq!(
        compile_policy(INLINE_POLICY).token_cache.keeps(),
        &KeepClaims::All
    );
    // Claim requirements and claim headers name theirs.
    let rules_at = INLINE_POLICY.find("rules:").unwrap();
    let named = format!(
        "{}upstream:\n  identity_headers:\n    x-department: claim:department\n\
         rules:\n  - id: tenant-bound\n    match: {{ operation: tenant }}\n    require: {{ claims: {{ tid: [contoso] }} }}\n",
        &INLINE_POLICY[..rules_at]
    );
    assert_eq!(
        compile_policy(&named).token_cache.keeps(),
        &KeepClaims::Named(vec!["department".to_owned(), "tid".to_owned()].into())
    );
}

/// A decision carries the rule's id and the identity headers' names as this thread's copies,
/// not clones of the policy's: on many cores those clones wrote the policy's counts, lines
/// every core moved between them on every request. The counts stay where they were however
/// many ALLOWs, STEP_UPs and DENYs are decided and held.
#[test]
fn decisions_leave_the_policys_strings_counts_alone() {
    let policy = demo_policy();
    let wire = policy
        .rules
        .iter()
        .find(|r| &*r.id == "wire-transfer")
        .expect("the demo's wire-transfer rule");
    let names: Vec<&Arc<str>> = policy
        .upstream
        .identity_headers
        .iter()
        .map(|(n, _)| n)
        .collect();
    assert!(!names.is_empty());
    let allow = rs256(&entra_user(&["c1"]));
    let step_up = rs256(&entra_user(&[]));
    let decide_all = || {
        [&allow, &step_up].map(|token| {
            decide(
                &policy,
                &op_request(token, "payments.wire_transfer", json!({})),
                NOW,
            )
        })
    };
    // The first decisions make this thread's copies.
    let first = decide_all();
    expect(&first[0], Outcome::Allow, 200, Reason::Allowed);
    assert_eq!(first[1].outcome, Outcome::StepUp);
    assert!(!first[0].identity_headers.is_empty());
    let counts = || {
        (
            Arc::strong_count(&wire.id),
            names
                .iter()
                .map(|n| Arc::strong_count(n))
                .collect::<Vec<_>>(),
        )
    };
    let before = counts();
    let held: Vec<_> = (0..50).map(|_| decide_all()).collect();
    for [allowed, stepped_up] in &held {
        assert_eq!(allowed.rule.as_deref(), Some("wire-transfer"));
        assert_eq!(stepped_up.rule.as_deref(), Some("wire-transfer"));
        assert!(!Arc::ptr_eq(allowed.rule.as_ref().unwrap(), &wire.id));
    }
    assert_eq!(counts(), before);
}

/// Under `path_case: either`, each other reading of the path is also tried in its own case: Go
/// and Flask read `/docs/GUIDE/` as sent, case and trailing slash both, and route it to the
/// `/docs/` subtree; Rails reads `/docs/INDEX.html` as `/docs/INDEX`. Either must pick the rule
/// the lower-case readings pick, or the request is refused as ambiguous, as it is under
/// `path_case: sensitive`.
#[test]
fn the_slash_and_extension_readings_are_tried_in_the_paths_own_case_too() {
    let private =
        "  - id: internal-docs\n    match: { path: \"/docs/**\" }\n    require: { roles: [staff] }";
    let public = |paths: &str| {
        format!(
            "  - id: public-docs\n    match: {{ methods: [GET], paths: [{paths}] }}\n    allow_anonymous: true\n{private}"
        )
    };
    let slash = public("\"/docs/*\", \"/docs/guide/**\""); // Go: `GET /docs/{page}`, `/docs/guide/`
    let extension = public("\"/docs/*.html\", /docs/index"); // Rails: `/docs/:page(.:format)`
    let smallest = public("/docs/a/, /docs/A");
    for (rules, refused, decided) in [
        (&slash, "/docs/GUIDE/", ["/docs/guide/", "/docs/guide"]),
        (
            &extension,
            "/docs/INDEX.html",
            ["/docs/index.html", "/docs/index"],
        ),
        (&smallest, "/docs/A/", ["/docs/a/", "/docs/A"]),
    ] {
        for case in ["", "  path_case: either\n", "  path_case: sensitive\n"] {
            let policy = with_first_rule(rules, case);
            let d = decide(&policy, &http_request("", "GET", refused), NOW);
            assert_eq!(
                (d.outcome, d.reason),
                (Outcome::Deny, Reason::AmbiguousPath),
                "{case:?} {refused}: {d:#?}"
            );
            assert_eq!(
                rule(&d),
                None,
                "{case:?} {refused}: named to no anonymous caller"
            );
        }
        // Paths whose readings agree in every case are decided as usual.
        let policy = with_first_rule(rules, "");
        for target in decided {
            let d = decide(&policy, &http_request("", "GET", target), NOW);
            assert_eq!(d.outcome, Outcome::Allow, "{target}: {d:#?}");
            assert_eq!(rule(&d), Some("public-docs"), "{target}");
        }
    }
}

/// A HEAD is read as a GET in the path's own case too, not only in lower case: an escalation
/// on GETs of upper-case names holds for a HEAD of one (Go, Express, Flask and Spring run the
/// GET handler for a HEAD).
#[test]
fn a_head_is_read_as_a_get_in_the_paths_own_case() {
    let policy = with_first_rule(
        "  - id: exports\n    match: { path: \"/exports/**\" }\n    require: { authenticated: true }\n    escalate:\n      - when: 'request.method == \"GET\" && request.path.matches(\"^/exports/[A-Z]+$\")'\n        require: { auth_contexts: [c2] }",
        "",
    );
    let token = bearer(&rs256(&entra_user(&["c1"])));
    for (method, target) in [
        ("GET", "/exports/QREPORT"),
        ("HEAD", "/exports/QREPORT"),
        ("HEAD", "/exports/QREPORT/"),
    ] {
        let d = decide(&policy, &http_request(&token, method, target), NOW);
        assert!(!d.is_allow(), "{method} {target}: {d:#?}");
        assert_eq!(rule(&d), Some("exports"), "{method} {target}");
    }
    for (method, target) in [("HEAD", "/exports/qreport"), ("POST", "/exports/QREPORT")] {
        let d = decide(&policy, &http_request(&token, method, target), NOW);
        expect(&d, Outcome::Allow, 200, Reason::Allowed);
    }
}

/// Most servers answer a HEAD with their GET handler: under a policy with a matcher that takes a
/// HEAD and not a GET, a HEAD is decided as a GET too, in every reading of its path, and the
/// stricter answer stands: a probe rule open to anyone does not open the export's GET handler.
/// A HEAD health check that both rules allow is allowed; a HEAD that two rules take, one asking
/// a step-up the other may not (a client would be challenged by each in turn for ever), is
/// refused as ambiguous.
#[test]
fn a_head_is_decided_as_a_get_too() {
    let policy = with_first_rule(
        "  - id: head-health\n    match: { methods: [HEAD], path: /healthz }\n    allow_anonymous: true\n  - id: get-health\n    match: { methods: [GET], path: /healthz }\n    allow_anonymous: true\n  - id: probe\n    match: [{ methods: [HEAD], path: /reports/** }, { methods: [GET], path: /reports/export.csv }]\n    allow_anonymous: true\n  - id: export\n    match: { methods: [GET], path: /reports/export }\n    require: { scopes: [reports.read] }\n  - id: head-c1\n    match: { methods: [HEAD], path: /ledger/** }\n    require: { auth_contexts: [c1] }\n  - id: get-c2\n    match: { methods: [GET], path: /ledger/** }\n    require: { auth_contexts: [c2] }",
        "",
    );
    let token = bearer(&rs256(&entra_user(&["c1"])));
    // The export's answer, whoever asks: a token is needed, and this one lacks the scope.
    let d = decide(&policy, &http_request("", "HEAD", "/reports/export"), NOW);
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    let d = decide(
        &policy,
        &http_request(&token, "HEAD", "/reports/export"),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::MissingScope);
    assert_eq!(rule(&d), Some("export"));
    // And in every other reading of the GET (its extension, case and slash), refused as the GET
    // itself is.
    for target in ["/reports/export.csv", "/Reports/export", "/reports/export/"] {
        for authorization in [String::new(), token.clone()] {
            let d = decide(&policy, &http_request(&authorization, "HEAD", target), NOW);
            assert_eq!(
                (d.outcome, d.http_status, d.reason),
                (Outcome::Deny, 400, Reason::AmbiguousPath),
                "{target} {}: {d:#?}",
                authorization.is_empty()
            );
            if authorization.is_empty() {
                assert_eq!(rule(&d), None, "{target}: named to no anonymous caller");
            }
        }
    }
    // The probe rule and the catch-all: the catch-all's answer to an anonymous caller; allowed
    // with a token, which both allow.
    let d = decide(&policy, &http_request("", "HEAD", "/reports/q4"), NOW);
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    let d = decide(&policy, &http_request(&token, "HEAD", "/reports/q4"), NOW);
    expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
    // Two step-ups, or a step-up beside an ALLOW, under two rules: refused, not challenged in
    // turn. Without a token, both rules' answer: one is needed.
    let none = bearer(&rs256(&entra_user(&[])));
    for authorization in [&none, &token] {
        let d = decide(
            &policy,
            &http_request(authorization, "HEAD", "/ledger/1"),
            NOW,
        );
        expect(&d, Outcome::Deny, 400, Reason::AmbiguousPath);
        assert_eq!(rule(&d), Some("head-c1"), "named to a verified caller");
        assert!(d.token_fingerprint.is_some());
    }
    let d = decide(&policy, &http_request("", "HEAD", "/ledger/1"), NOW);
    expect(&d, Outcome::Deny, 401, Reason::TokenMissing);
    // Allowed either way: the HEAD's own rule decides.
    let d = decide(&policy, &http_request("", "HEAD", "/healthz"), NOW);
    expect(&d, Outcome::Allow, 200, Reason::AnonymousAllowed);
    assert_eq!(rule(&d), Some("head-health"));
    // The GETs themselves are decided as usual.
    let d = decide(
        &policy,
        &http_request(&token, "GET", "/reports/export"),
        NOW,
    );
    expect(&d, Outcome::Deny, 403, Reason::MissingScope);
    // The explain trace says why, naming the rule each reading settled on, though neither is
    // named to this caller.
    let explained = decide(
        &policy,
        &AccessRequest {
            explain: true,
            ..http_request("", "HEAD", "/ledger/1")
        },
        NOW,
    );
    assert!(
        explained.explain.iter().any(|s| s.stage == "head"
            && s.detail
                .contains("DENY (token_missing) under rule \"get-c2\"")),
        "{:#?}",
        explained.explain
    );
    let explained = decide(
        &policy,
        &AccessRequest {
            explain: true,
            ..http_request(&none, "HEAD", "/ledger/1")
        },
        NOW,
    );
    assert!(
        explained.explain.iter().any(|s| s.stage == "head"
            && s.detail.contains(
                "rule \"head-c1\" as a HEAD (STEP_UP) and rule \"get-c2\" as a GET (STEP_UP)"
            )),
        "{:#?}",
        explained.explain
    );
}
