//! The policy loader (`config::parse`, `policy::compile`) on any text: a policy is compiled or
//! refused with an error, never a panic; and a policy compiled decides requests on a thread with
//! a worker's 2 MiB stack, its conditions evaluated, without overflowing it.

use std::path::Path;

use crate::request::{AccessRequest, Headers, HttpAttributes};

pub fn check(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(file) = crate::config::parse(text) else {
        return;
    };
    let Ok(policy) = crate::policy::compile(&file, Path::new(".")) else {
        return;
    };
    let attributes = serde_json::json!({"a": 1, "amount": 25_000, "s": "x"});
    let requests = [
        AccessRequest {
            operation: Some("op.x".into()),
            attributes: attributes.as_object().cloned().unwrap_or_default(),
            ..Default::default()
        },
        AccessRequest {
            http: Some(HttpAttributes::new("GET", "h", "/a/b", Headers::default())),
            ..Default::default()
        },
    ];
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn_scoped(scope, || {
                for request in &requests {
                    let _ = crate::decision::decide(&policy, request, 1_700_000_000);
                }
            })
            .expect("a thread")
            .join()
            .expect("deciding panicked");
    });
}

/// Starting points for the fuzzer: the demo policy, and small policies using each feature.
pub fn seeds() -> Vec<Vec<u8>> {
    let demo = include_str!("../../examples/stepgate.yaml");
    let small = r#"
issuers:
  - id: a
    issuer: "https://login.microsoftonline.com/{tenantid}/v2.0"
    jwks_uri: https://login.microsoftonline.com/common/discovery/v2.0/keys
    any_tenant: true
    audiences: [api]
    keys: { refresh: 1h, unknown_kid_wait: 250ms }
rules:
  - id: r
    match: [{ path: "/a/**", methods: [GET], when: 'request.headers["x"] == "y"' }, { operation: "op.*" }]
    require: { claims: { tid: [a, b] }, max_age: 15m, when: 'has(claims.x)' }
    escalate:
      - { when: 'now > 0', require: { acr: [x] } }
upstream:
  identity_headers: { x-sub: subject, x-dept: "claim:dept" }
  path_parameters: strip
limits: { token_cache_bytes: 64MiB, max_header_count: 10 }
"#;
    // An operator chain without brackets, deeper than a condition's syntax tree may be.
    let chain = format!(
        "issuers:\n  - {{ id: a, issuer: \"https://idp.example\", jwks_uri: \"https://idp.example/k\", \
         audiences: [api] }}\nrules:\n  - id: c\n    match: {{ operation: \"op.*\", when: \
         'request.attributes.a{} > 0' }}\n    require: {{ authenticated: true }}\n",
        " + 1".repeat(300)
    );
    vec![
        demo.as_bytes().to_vec(),
        small.as_bytes().to_vec(),
        chain.into_bytes(),
    ]
}
