//! The rule index decides exactly as the plain ordered scan: random policies (operations exact and
//! wildcard, methods, hosts with and without ports, path globs in either letter case, read in lower
//! case and in their own, with `*` and `**`, gRPC services and methods, conditions
//! that hold, fail or cannot be evaluated, shadow rules) against random requests, from every rule
//! a search may resume at. And whatever the engine allows, it allows under the rule every reading
//! of the path an upstream may route by picks (in lower case and in its own, with its trailing
//! slash read apart, without the extension of its last segment).

use proptest::prelude::*;

use super::{PathReading, decide, find_rule, first_enforced, scan_rules};
use crate::{
    decision::Outcome,
    policy::{Policy, condition::CelInput, testing::compile_policy},
    request::{
        AccessRequest, Headers, HttpAttributes,
        path::{self, PathParameters},
    },
};

const OPERATIONS: &[&str] = &["p.q", "p.r", "s.q", "p", "pq", "é.q"];
const OPERATION_PATTERNS: &[&str] = &["p.q", "p.r", "s.q", "p", "p.*", "*", "*.q", "s*", "p*q"];
const SEGMENTS: &[&str] = &[
    "a", "b", "ab", "svc.a", "m", "x", "A", "Ab", "x.json", "X.json", "a.b.json", "A.json", ".x",
    ".x.json",
];
const GLOB_SEGMENTS: &[&str] = &[
    "a", "b", "ab", "svc.a", "m", "*", "a*", "*b", "**", "A", "*B", "*.json", "x.json", "X", "x",
    ".x",
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

/// A glob, now and then with a trailing slash of its own (Go's subtree, Flask's `strict_slashes`).
fn glob() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(pick(GLOB_SEGMENTS), 0..4),
        proptest::bool::weighted(0.2),
    )
        .prop_map(|(segments, slash)| {
            let slash = if slash && !segments.is_empty() {
                "/"
            } else {
                ""
            };
            format!("/{}{slash}", segments.join("/"))
        })
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
            head_as_get: false,
        }),
        // In case, and a trailing slash read apart (the index files globs by their literal
        // prefix, whichever reading).
        find(PathReading {
            lowered,
            in_case: path,
            slash_apart: path.is_some_and(|p| p.ends_with('/')),
            head_as_get: false,
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

/// The readings of `path` (normalised, in its own case) that some upstream routes by, under
/// `path_case: either` and `format_suffix: either`: the path and each of its extension's cuts,
/// in lower case and in its own, and the path with its trailing slash read apart (in both).
fn upstream_readings(path: &str) -> Vec<(String, Option<String>, bool)> {
    let mut readings = Vec::new();
    let [first, last] = path::without_extension(path);
    for (p, cut) in std::iter::once((path.to_owned(), false))
        .chain([first, last].into_iter().flatten().map(|c| (c, true)))
    {
        let apart = [false, !cut && p.len() > 1 && p.ends_with('/')];
        for slash_apart in apart.into_iter().filter(|&a| a).chain([false]) {
            readings.push((p.to_ascii_lowercase(), None, slash_apart));
            readings.push((p.to_ascii_lowercase(), Some(p.clone()), slash_apart));
        }
    }
    readings
}

proptest! {
    // Enough cases to meet the rarer shapes (an upper-case glob, a trailing slash and an
    // extension together) in every run.
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// An ALLOW under rule R (or under the default, no rule) is what every reading of the path
    /// picks: no reading an upstream may route by leads to another rule, so no request is let
    /// through under a rule its upstream does not route it to.
    #[test]
    fn what_is_allowed_every_reading_picks(
        yaml in policy_yaml(),
        requests in proptest::collection::vec(request(), 1..12),
    ) {
        let policy = compile_policy(&yaml);
        for (request, sent) in &requests {
            let d = decide(&policy, request, 0);
            if d.outcome != Outcome::Allow {
                continue;
            }
            let allowed = d
                .rule
                .as_deref()
                .map(|id| policy.rules.iter().position(|r| &*r.id == id).expect("a rule of the policy"));
            let Some(sent) = sent else { continue };
            let Ok((normalized, _)) = path::normalize(sent, PathParameters::Refuse) else {
                continue;
            };
            let input = CelInput::new(&policy.cel, request, Some(&normalized), None, 0);
            for (lowered, in_case, slash_apart) in upstream_readings(&normalized) {
                let reading = PathReading {
                    lowered: Some(&lowered),
                    in_case: in_case.as_deref(),
                    slash_apart,
                    head_as_get: false,
                };
                let picked = match first_enforced(&policy, request, reading, &input) {
                    Ok(at) => at,
                    Err(at) => Some(at),
                };
                prop_assert_eq!(
                    picked, allowed,
                    "{:?} allowed under {:?}, and read as {:?} picks another rule in\n{}",
                    sent, d.rule, reading, yaml
                );
            }
        }
    }
}

/// A matcher now and then taking one method (HEAD among them), for [`policy_yaml_mixed`].
fn matcher_heads() -> impl Strategy<Value = String> {
    (
        proptest::option::weighted(0.5, pick(&["GET", "POST", "HEAD"])),
        proptest::collection::vec(glob(), 1..3),
        proptest::option::weighted(0.1, pick(CONDITIONS)),
    )
        .prop_map(|(method, paths, when)| {
            let mut parts = Vec::new();
            if let Some(m) = method {
                parts.push(format!("methods: [{m}]"));
            }
            parts.push(format!("paths: {paths:?}"));
            if let Some(w) = when {
                parts.push(format!("when: {w:?}"));
            }
            format!("{{ {} }}", parts.join(", "))
        })
}

/// Public and protected rules, some shadows, matchers taking GET, POST or HEAD.
fn policy_yaml_mixed() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        (
            proptest::collection::vec(matcher_heads(), 1..3),
            any::<bool>(),
            proptest::bool::weighted(0.1),
        ),
        1..8,
    )
    .prop_map(|rules| {
        let mut yaml = String::from(
            "issuers:\n  - id: demo\n    issuer: https://issuer.example\n    \
         jwks_file: demo-keys/jwks.json\n    audiences: [api]\nrules:\n",
        );
        for (i, (matchers, public, shadow)) in rules.iter().enumerate() {
            yaml.push_str(&format!(
                "  - id: r{i}\n    match: [{}]\n",
                matchers.join(", ")
            ));
            if *shadow {
                yaml.push_str("    mode: shadow\n");
            }
            if *public {
                yaml.push_str("    allow_anonymous: true\n");
            }
        }
        yaml
    })
}

/// A GET, POST or HEAD, its path now and then with an empty segment (refused).
fn request_heads() -> impl Strategy<Value = (AccessRequest, String)> {
    (
        pick(&["GET", "POST", "HEAD"]),
        proptest::collection::vec(prop_oneof![pick(SEGMENTS), Just("")], 0..4),
        proptest::option::of(0i64..3),
    )
        .prop_map(|(method, segments, x)| {
            let mut attributes = serde_json::Map::new();
            if let Some(x) = x {
                attributes.insert("x".into(), x.into());
            }
            let path = format!("/{}", segments.join("/"));
            let request = AccessRequest {
                http: Some(HttpAttributes::new(
                    method,
                    "h",
                    path.clone(),
                    Headers::default(),
                )),
                attributes,
                ..AccessRequest::default()
            };
            (request, path)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// An anonymous ALLOW under public and protected rules: every reading an upstream may route
    /// by (a HEAD read as a GET too) picks a rule open to anonymous callers.
    #[test]
    fn an_anonymous_allow_is_public_in_every_reading_a_head_as_a_get_too(
        yaml in policy_yaml_mixed(),
        requests in proptest::collection::vec(request_heads(), 1..10),
    ) {
        let policy = compile_policy(&yaml);
        for (request, sent) in &requests {
            let d = decide(&policy, request, 0);
            if d.outcome != Outcome::Allow {
                continue;
            }
            let Ok((normalized, _)) = path::normalize(sent, PathParameters::Refuse) else {
                continue;
            };
            let input = CelInput::new(&policy.cel, request, Some(&normalized), None, 0);
            let head = request.http.as_ref().unwrap().method == "HEAD";
            for as_get in [false, true].into_iter().filter(|g| !g || head) {
                for (lowered, in_case, slash_apart) in upstream_readings(&normalized) {
                    let reading = PathReading {
                        lowered: Some(&lowered),
                        in_case: in_case.as_deref(),
                        slash_apart,
                        head_as_get: as_get,
                    };
                    let picked = first_enforced(&policy, request, reading, &input);
                    let public = matches!(picked, Ok(Some(at)) if policy.rules[at].allow_anonymous);
                    prop_assert!(
                        public,
                        "{} {:?} allowed under {:?}, and read as {:?} picks {:?} in\n{}",
                        request.http.as_ref().unwrap().method, sent, d.rule, reading, picked, yaml
                    );
                }
            }
        }
    }
}
