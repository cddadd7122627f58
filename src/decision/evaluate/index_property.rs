//! The rule index decides exactly as the plain ordered scan: random policies (operations exact and
//! wildcard, methods, hosts with and without ports, path globs in either letter case, read in lower
//! case and in their own, with `*` and `**`, gRPC services and methods, conditions
//! that hold, fail or cannot be evaluated, shadow rules) against random requests, from every rule
//! a search may resume at.

use proptest::prelude::*;

use super::{PathReading, find_rule, scan_rules};
use crate::{
    policy::{Policy, condition::CelInput, testing::compile_policy},
    request::{AccessRequest, Headers, HttpAttributes},
};

const OPERATIONS: &[&str] = &["p.q", "p.r", "s.q", "p", "pq", "é.q"];
const OPERATION_PATTERNS: &[&str] = &["p.q", "p.r", "s.q", "p", "p.*", "*", "*.q", "s*", "p*q"];
const SEGMENTS: &[&str] = &["a", "b", "ab", "svc.a", "m", "x", "A", "Ab"];
const GLOB_SEGMENTS: &[&str] = &[
    "a", "b", "ab", "svc.a", "m", "*", "a*", "*b", "**", "A", "*B",
];
const CONDITIONS: &[&str] = &[
    "true",
    "false",
    "request.attributes.x == 1",
    // An error when `y` is absent: the rule denies, and a later rule must not decide instead.
    "request.attributes.y > 1",
    "request.method == 'GET'",
];

fn pick(from: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    proptest::sample::select(from)
}

fn glob() -> impl Strategy<Value = String> {
    proptest::collection::vec(pick(GLOB_SEGMENTS), 0..4)
        .prop_map(|segments| format!("/{}", segments.join("/")))
}

/// One matcher as policy YAML (a flow mapping), with at least one part.
fn matcher() -> impl Strategy<Value = String> {
    (
        proptest::option::weighted(0.4, pick(OPERATION_PATTERNS)),
        proptest::option::weighted(0.3, pick(&["GET", "POST"])),
        proptest::option::weighted(0.2, pick(&["a.example", "*.example", "a.example:8443"])),
        proptest::collection::vec(glob(), 0..3),
        proptest::option::weighted(
            0.15,
            (
                pick(&["svc.a", "SVC.A", "svc.*"]),
                proptest::option::of(pick(&["m", "*"])),
            ),
        ),
        proptest::option::weighted(0.3, pick(CONDITIONS)),
    )
        .prop_map(|(operation, method, host, paths, grpc, when)| {
            let mut parts = Vec::new();
            if let Some(op) = operation {
                parts.push(format!("operation: {op:?}"));
            }
            if let Some(m) = method {
                parts.push(format!("methods: [{m}]"));
            }
            if let Some(h) = host {
                parts.push(format!("host: {h:?}"));
            }
            if !paths.is_empty() {
                parts.push(format!("paths: {paths:?}"));
            }
            if let Some((service, method)) = grpc {
                match method {
                    Some(m) => parts.push(format!("grpc: {{service: {service:?}, method: {m:?}}}")),
                    None => parts.push(format!("grpc: {{service: {service:?}}}")),
                }
            }
            if let Some(w) = when {
                parts.push(format!("when: {w:?}"));
            }
            if parts.is_empty() {
                parts.push("paths: [\"/**\"]".into());
            }
            format!("{{ {} }}", parts.join(", "))
        })
}

fn policy_yaml() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(
            (proptest::collection::vec(matcher(), 1..4), any::<bool>()),
            1..14,
        ),
        pick(&["routed", "ignored"]),
    )
        .prop_map(|(rules, host_port)| {
            let mut yaml = String::from(
                "issuers:\n  - id: demo\n    issuer: https://issuer.example\n    \
             jwks_file: demo-keys/jwks.json\n    audiences: [api]\nrules:\n",
            );
            for (i, (matchers, shadow)) in rules.iter().enumerate() {
                yaml.push_str(&format!(
                    "  - id: r{i}\n    match: [{}]\n",
                    matchers.join(", ")
                ));
                if *shadow {
                    yaml.push_str("    mode: shadow\n");
                }
                yaml.push_str("    allow_anonymous: true\n");
            }
            yaml.push_str(&format!("upstream:\n  host_port: {host_port}\n"));
            yaml
        })
}

/// A request: an operation, an HTTP request, or both; the path as the engine hands it over
/// (lower-cased), empty segments and a trailing slash included.
fn request() -> impl Strategy<Value = (AccessRequest, Option<String>)> {
    (
        proptest::option::of(pick(OPERATIONS)),
        proptest::option::weighted(
            0.8,
            (
                pick(&["GET", "POST"]),
                pick(&[
                    "a.example",
                    "b.example",
                    "example",
                    "a.example:8443",
                    "a.example.",
                    "a.example.:8443",
                ]),
                proptest::collection::vec(prop_oneof![pick(SEGMENTS), Just("")], 0..5),
            ),
        ),
        proptest::option::of(0i64..3),
        proptest::option::of(0i64..3),
    )
        .prop_map(|(operation, http, x, y)| {
            let mut attributes = serde_json::Map::new();
            if let Some(x) = x {
                attributes.insert("x".into(), x.into());
            }
            if let Some(y) = y {
                attributes.insert("y".into(), y.into());
            }
            let path = http
                .as_ref()
                .map(|(_, _, segments)| format!("/{}", segments.join("/")));
            let request = AccessRequest {
                operation: operation.map(str::to_owned),
                http: http.map(|(method, host, _)| {
                    HttpAttributes::new(method, host, path.clone().unwrap(), Headers::default())
                }),
                attributes,
                ..AccessRequest::default()
            };
            (request, path)
        })
}

type Match = Result<Option<usize>, (usize, String)>;

/// (rule index, or the index and message of the rule whose condition failed), with the path
/// read in lower case and read in its own case.
fn first_match(
    policy: &Policy,
    from: usize,
    request: &AccessRequest,
    path: Option<&str>,
    indexed: bool,
) -> (Match, Match) {
    let lowered = path.map(str::to_ascii_lowercase);
    let input = CelInput::new(&policy.cel, request, path, None, 0);
    let find = |reading: PathReading<'_>| {
        let found = if indexed {
            find_rule(policy, from, request, reading, &input)
        } else {
            scan_rules(policy, from, request, reading, &input)
        };
        found
            .map(|m| m.map(|(at, _)| at))
            .map_err(|(at, _, undecided)| (at, format!("{undecided:?}")))
    };
    let lowered = lowered.as_deref();
    (
        find(PathReading {
            lowered,
            in_case: None,
            slash_apart: false,
        }),
        // In case, and a trailing slash read apart (the index files globs by their literal
        // prefix, whichever reading).
        find(PathReading {
            lowered,
            in_case: path,
            slash_apart: path.is_some_and(|p| p.ends_with('/')),
        }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn the_index_finds_what_the_scan_finds(
        yaml in policy_yaml(),
        requests in proptest::collection::vec(request(), 1..12),
    ) {
        let policy = compile_policy(&yaml);
        for (request, path) in &requests {
            for from in 0..=policy.rules.len() {
                let scanned = first_match(&policy, from, request, path.as_deref(), false);
                let indexed = first_match(&policy, from, request, path.as_deref(), true);
                prop_assert_eq!(&indexed, &scanned, "from rule {} of\n{}\n{:?} {:?}", from, yaml, request, path);
            }
        }
    }
}

/// The property is not vacuous: the generated cases do reach rules through every kind of key.
#[test]
fn the_index_files_by_every_key() {
    let policy = compile_policy(
        "issuers:\n  - id: demo\n    issuer: https://issuer.example\n    \
         jwks_file: demo-keys/jwks.json\n    audiences: [api]\nrules:\n\
         \x20 - { id: op, match: { operation: p.q }, allow_anonymous: true }\n\
         \x20 - { id: opw, match: { operation: \"p.*\" }, allow_anonymous: true }\n\
         \x20 - { id: path, match: { path: \"/a/*/b\" }, allow_anonymous: true }\n\
         \x20 - { id: grpc, match: { grpc: { service: SVC.A } }, allow_anonymous: true }\n\
         \x20 - { id: any, match: { methods: [GET] }, allow_anonymous: true }\n",
    );
    let shape = policy.index.shape();
    assert_eq!(
        (
            shape.by_exact_operation,
            shape.by_operation_prefix,
            shape.by_path_prefix,
            shape.scanned_always
        ),
        (1, 1, 2, 1),
        "{shape}"
    );
    let at = |op: Option<&str>, path: Option<&str>| {
        let request = AccessRequest {
            operation: op.map(str::to_owned),
            http: path.map(|p| HttpAttributes::new("POST", "h", p, Headers::default())),
            ..AccessRequest::default()
        };
        first_match(&policy, 0, &request, path, true).0
    };
    assert_eq!(at(Some("p.q"), None), Ok(Some(0)));
    assert_eq!(at(Some("p.r"), None), Ok(Some(1)));
    assert_eq!(at(None, Some("/a/x/b")), Ok(Some(2)));
    assert_eq!(at(None, Some("/svc.a/m")), Ok(Some(3)));
    assert_eq!(at(None, Some("/a/x/c")), Ok(None));
}
