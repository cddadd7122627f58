//! The policy loader (`config::parse`, `policy::compile`) on any text: a policy is compiled or
//! refused with an error, never a panic.

use std::path::Path;

pub fn check(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(file) = crate::config::parse(text) {
        let _ = crate::policy::compile(&file, Path::new("."));
    }
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
    vec![demo.as_bytes().to_vec(), small.as_bytes().to_vec()]
}
