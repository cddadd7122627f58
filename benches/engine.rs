//! Micro-benchmarks of the engine, so that a regression shows without a load run:
//! `cargo bench --bench engine` (CI runs each once in test mode through `cargo test --benches`).
//!
//! - `decide/*`: the whole `decide()` for a request shaped like an Envoy `Check` — cached and
//!   uncached token verification (RS256, ES256), a step-up with the Entra claims challenge, a
//!   `Decide` call with a CEL escalation, an anonymous `Decide` with 1000 attribute values
//!   against 20 matcher conditions;
//! - `check/*`: the whole `Check` path minus the transport — an encoded Envoy `CheckRequest`
//!   decoded, read into an `AccessRequest`, decided, rendered as a `CheckResponse` and encoded
//!   (`allow_cached_token`), against the empty server's share of the same work: envoy-types'
//!   decoding and an empty OK answer (`floor_decode_answer_ok`);
//! - `verify/*`: token verification alone;
//! - `challenge/*`: `WWW-Authenticate` rendering.

use std::{hint::black_box, path::Path};

use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::Algorithm;
use serde_json::json;
use stepgate::{
    challenge,
    decision::{Outcome, decide},
    demo::{self, DEMO_EC_KID, DEMO_RSA_KID, TokenSpec},
    identity::{EntraChallenge, KeepClaims, intern::Interner, jwks::KeySet, verify},
    policy::Policy,
    request::{AccessRequest, Headers, HttpAttributes, PresentedCredential},
};

const NOW: i64 = 1_800_000_000;
const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// The demo policy with `extra` appended, compiled, its issuers given the demo keys.
fn policy(extra: &str) -> Policy {
    compiled(&(demo_policy_text() + extra))
}

fn demo_policy_text() -> String {
    std::fs::read_to_string(format!("{MANIFEST}/examples/stepgate.yaml")).unwrap()
}

/// Policy YAML (relative key files resolve under `examples/`), compiled, with the demo keys.
fn compiled(text: &str) -> Policy {
    let file = stepgate::config::parse(text).unwrap();
    let policy = stepgate::policy::compile(&file, &Path::new(MANIFEST).join("examples")).unwrap();
    let jwks = std::fs::read(format!("{MANIFEST}/examples/demo-keys/jwks.json")).unwrap();
    for issuer in policy.issuers.iter() {
        issuer.set_keys(KeySet::parse(&jwks).unwrap().0);
    }
    policy
}

/// A rule with many `**`, which a backtracking matcher takes exponential time on.
const GLOB_WORST_RULE: &str = "  - id: glob-worst\n    match: { path: \"/**/a/**/a/**/z\" }\n    require: { authenticated: true }\n";

/// The demo policy with `rule` (YAML, indented as a list item) before its own rules.
fn policy_with_rule(rule: &str) -> Policy {
    compiled(&demo_policy_text().replacen("rules:", &format!("rules:\n{rule}"), 1))
}

fn token(spec: &TokenSpec, alg: Algorithm) -> String {
    let (file, kid) = match alg {
        Algorithm::ES256 => ("demo-ec-private.pem", DEMO_EC_KID),
        _ => ("demo-rsa-private.pem", DEMO_RSA_KID),
    };
    let pem = std::fs::read(format!("{MANIFEST}/examples/demo-keys/{file}")).unwrap();
    demo::sign(&spec.claims(NOW), &pem, alg, kid).unwrap()
}

/// An Envoy-shaped request: method, authority, path and a handful of headers.
fn check_request(token: &str, method: &str, path: &str) -> AccessRequest {
    let mut headers = Headers::default();
    for (k, v) in [
        (":authority", "api.example.com"),
        (":method", method),
        (":path", path),
        (":scheme", "https"),
        ("user-agent", "bench"),
        ("x-request-id", "6b1f0c5e-5d8e-4d1a-9c71-0d6a8f0e2f11"),
    ] {
        headers.insert(k.to_owned(), v.to_owned());
    }
    headers.insert("authorization".to_owned(), format!("Bearer {token}"));
    AccessRequest {
        credential: PresentedCredential::Authorization(format!("Bearer {token}")),
        http: Some(HttpAttributes::new(
            method,
            "api.example.com",
            path,
            headers,
        )),
        proxy_header_count: Some(7),
        ..AccessRequest::default()
    }
}

fn decide_benches(c: &mut Criterion) {
    let cached = policy("");
    let uncached = policy("\nlimits: { token_cache_entries: 0 }\n");
    let user = TokenSpec {
        acrs: vec!["c1".into()],
        xms_cc: vec!["cp1".into()],
        ..TokenSpec::default()
    };
    let rs256 = token(&user, Algorithm::RS256);
    let es256 = token(&user, Algorithm::ES256);
    let allow = check_request(&rs256, "GET", "/accounts/42");
    let allow_es = check_request(&es256, "GET", "/accounts/42");
    assert_eq!(decide(&cached, &allow, NOW).outcome, Outcome::Allow);
    assert_eq!(decide(&uncached, &allow_es, NOW).outcome, Outcome::Allow);

    let mut group = c.benchmark_group("decide");
    group.bench_function("check_allow_cached_token", |b| {
        b.iter(|| decide(&cached, black_box(&allow), NOW))
    });
    group.bench_function("check_allow_uncached_rs256", |b| {
        b.iter(|| decide(&uncached, black_box(&allow), NOW))
    });
    group.bench_function("check_allow_uncached_es256", |b| {
        b.iter(|| decide(&uncached, black_box(&allow_es), NOW))
    });

    let weak = token(
        &TokenSpec {
            xms_cc: vec!["cp1".into()],
            ..TokenSpec::default()
        },
        Algorithm::RS256,
    );
    let step_up = check_request(&weak, "POST", "/payments/wire");
    assert_eq!(decide(&cached, &step_up, NOW).outcome, Outcome::StepUp);
    group.bench_function("check_step_up_entra_challenge", |b| {
        b.iter(|| decide(&cached, black_box(&step_up), NOW))
    });

    let escalation = AccessRequest {
        credential: PresentedCredential::Token(rs256.clone()),
        operation: Some("payments.wire_transfer".into()),
        attributes: json!({"amount": 25000.0}).as_object().unwrap().clone(),
        ..AccessRequest::default()
    };
    assert_eq!(decide(&cached, &escalation, NOW).outcome, Outcome::StepUp);
    group.bench_function("decide_cel_escalation", |b| {
        b.iter(|| decide(&cached, black_box(&escalation), NOW))
    });

    // An anonymous `Decide` with as many attribute values as the default limit admits, against
    // rules whose conditions read `request`: the matcher conditions run before the missing token
    // is answered, each against the request's attributes.
    let rules: String = (0..20)
        .map(|i| {
            format!(
                "  - id: bulk-{i}\n    match: {{ operation: bulk.op, when: 'request.attributes.k0 == \"v{i}\"' }}\n    require: {{ authenticated: true }}\n"
            )
        })
        .collect();
    let conditions = policy_with_rule(&rules);
    let attributes: serde_json::Map<String, serde_json::Value> = (0..1000)
        .map(|i| (format!("k{i}"), json!(format!("value {i}"))))
        .collect();
    let anonymous = AccessRequest {
        operation: Some("bulk.op".into()),
        attributes,
        ..AccessRequest::default()
    };
    assert_eq!(decide(&conditions, &anonymous, NOW).outcome, Outcome::Deny);
    group.bench_function("decide_anonymous_1000_attributes_20_conditions", |b| {
        b.iter(|| decide(&conditions, black_box(&anonymous), NOW))
    });

    let mut bad = rs256.clone();
    bad.pop();
    bad.push(if rs256.ends_with('A') { 'B' } else { 'A' });
    let invalid = check_request(&bad, "GET", "/accounts/42");
    assert_eq!(decide(&cached, &invalid, NOW).outcome, Outcome::Deny);
    group.bench_function("check_deny_bad_signature", |b| {
        b.iter(|| decide(&cached, black_box(&invalid), NOW))
    });
    group.finish();

    let mut group = c.benchmark_group("verify");
    let (keep, interner) = (KeepClaims::Named(Box::new([])), Interner::default());
    group.bench_function("rs256", |b| {
        b.iter(|| {
            verify(
                black_box(&rs256),
                &uncached.issuers,
                16_384,
                NOW,
                &keep,
                &interner,
            )
        })
    });
    group.bench_function("es256", |b| {
        b.iter(|| {
            verify(
                black_box(&es256),
                &uncached.issuers,
                16_384,
                NOW,
                &keep,
                &interner,
            )
        })
    });
    group.finish();
}

fn challenge_benches(c: &mut Criterion) {
    let entra = EntraChallenge {
        authorization_uri: "https://login.microsoftonline.com/common/oauth2/authorize".into(),
        realm: String::new(),
        client_id: None,
    };
    let acr = vec!["urn:okta:loa:2fa:any".to_owned(), "phr".to_owned()];
    let mut group = c.benchmark_group("challenge");
    group.bench_function("entra_claims", |b| {
        b.iter(|| {
            let json = challenge::entra_claims_request(black_box("c1"));
            challenge::entra_claims(&entra, &challenge::encode_claims(&json))
        })
    });
    group.bench_function("rfc9470", |b| {
        b.iter(|| {
            challenge::insufficient_user_authentication(
                black_box("api"),
                "a sign-in within 900 seconds is required",
                &acr,
                Some(900),
            )
        })
    });
    group.finish();
}

fn check_benches(c: &mut Criterion) {
    use prost::Message as _;
    use stepgate::server::{
        answer::CheckAnswer, check_request::CheckRequest, ext_authz::access_request,
    };
    let policy = policy("");
    let user = TokenSpec {
        acrs: vec!["c1".into()],
        xms_cc: vec!["cp1".into()],
        ..TokenSpec::default()
    };
    let allow = demo::envoy_check_request(
        "GET",
        "api.example.com",
        "/accounts/42",
        &token(&user, Algorithm::RS256),
    )
    .encode_to_vec();
    let allow_frame = bytes::Bytes::from(allow.clone());
    let check = |frame: bytes::Bytes| {
        let request = access_request(CheckRequest::decode(frame, policy.header_limits).unwrap());
        let decision = decide(&policy, &request, NOW);
        let answer = CheckAnswer::new(decision, &policy);
        (answer.decision().outcome, answer.encode_to_vec())
    };
    assert_eq!(check(allow_frame.clone()).0, Outcome::Allow);
    let mut group = c.benchmark_group("check");
    group.bench_function("allow_cached_token", |b| {
        b.iter(|| check(black_box(allow_frame.clone())))
    });
    // The worst case of path globs (a rule `/**/a/**/a/**/z` before the demo policy's, a path of
    // 1500 segments), anonymous, against the same server's plain path: within 2×.
    let globbed = policy_with_rule(GLOB_WORST_RULE);
    let anonymous = |path: &str| {
        let mut request = demo::envoy_check_request("GET", "api.example.com", path, "");
        let http = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.headers.remove("authorization");
        bytes::Bytes::from(request.encode_to_vec())
    };
    let check_anonymous = |frame: bytes::Bytes| {
        let request = access_request(CheckRequest::decode(frame, globbed.header_limits).unwrap());
        let decision = decide(&globbed, &request, NOW);
        CheckAnswer::new(decision, &globbed).encode_to_vec()
    };
    let plain = anonymous("/accounts/42");
    let worst = anonymous(&"/a".repeat(1500));
    for frame in [&plain, &worst] {
        let request =
            access_request(CheckRequest::decode(frame.clone(), globbed.header_limits).unwrap());
        assert_eq!(
            decide(&globbed, &request, NOW).reason.as_str(),
            "token_missing"
        );
    }
    group.bench_function("anonymous_plain_path", |b| {
        b.iter(|| check_anonymous(black_box(plain.clone())))
    });
    group.bench_function("anonymous_glob_worst_case", |b| {
        b.iter(|| check_anonymous(black_box(worst.clone())))
    });
    // The transport floor's share of the same work: decode, drop, answer an empty OK.
    group.bench_function("floor_decode_answer_ok", |b| {
        b.iter(|| {
            let request = envoy_types::pb::envoy::service::auth::v3::CheckRequest::decode(
                black_box(&allow[..]),
            )
            .unwrap();
            drop(black_box(request));
            envoy_types::pb::envoy::service::auth::v3::CheckResponse {
                status: Some(Default::default()),
                ..Default::default()
            }
            .encode_to_vec()
        })
    });
    group.finish();
}

criterion_group!(benches, decide_benches, check_benches, challenge_benches);
criterion_main!(benches);
