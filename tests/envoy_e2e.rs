//! End-to-end through the real Envoy 1.40: a client talks HTTP/1.1 or gRPC to Envoy running the
//! example configs (`examples/envoy/*.yaml`, ports rewritten), Envoy asks the real `stepgate`
//! binary over ext_authz, and allowed requests reach an echo upstream that records what it got.
//!
//! Every test starts its own stepgate, echo upstream and Envoy (Envoy is ready in well under a
//! second), so tests share nothing and run in parallel. Requests carry an `x-e2e-case` header so
//! the upstream's record tells which scenario reached it.
//!
//! Envoy: `$STEPGATE_ENVOY`, else `.venv/bin/envoy` (`./scripts/setup-peers` installs it).

mod common;
#[path = "common/envoy.rs"]
mod envoy;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{
    Server, Spawn, TempPolicy, demo_policy_path, demo_policy_text, edit, entra, mint, oidc,
};
use envoy::{ENVOY_RAW_HEADERS_YAML, ENVOY_YAML, Echo, Envoy, Recorded, Silent, free_port};
use reqwest::{
    Method,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use sha2::{Digest as _, Sha256};
use stepgate::demo::TokenSpec;

/// The header that names a request's scenario, so the echo's record can be filtered by it.
const CASE: &str = "x-e2e-case";

/// What the demo policy answers to a password-only Entra token from a `cp1` client on the wire
/// transfer: the claims challenge for authentication context c1.
const ENTRA_C1_CHALLENGE: &str = "Bearer realm=\"\", \
     authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", \
     error=\"insufficient_claims\", \
     claims=\"eyJhY2Nlc3NfdG9rZW4iOnsiYWNycyI6eyJlc3NlbnRpYWwiOnRydWUsInZhbHVlIjoiYzEifX19\"";

/// The claims request that `claims` encodes.
const C1_CLAIMS_JSON: &str = r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#;

/// The bare challenge of the demo policy's realm.
const BARE_CHALLENGE: &str = "Bearer realm=\"stepgate-demo\"";

/// The tenant (`tid`) of `TokenSpec::default()`.
const DEMO_TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

/// The identity headers of examples/stepgate.yaml.
const IDENTITY_HEADERS: [&str; 4] = [
    "x-stepgate-subject",
    "x-stepgate-tenant",
    "x-stepgate-auth-contexts",
    "x-stepgate-rule",
];

/// How long to wait for a request's access log line (the launcher makes Envoy flush its stdout
/// every 100 ms; the margin is for a loaded machine).
const ACCESS_LOG_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The stack: stepgate + echo upstream + Envoy
// ---------------------------------------------------------------------------------------------

struct Stack {
    envoy: Envoy,
    echo: Echo,
    server: Option<Server>,
    _policy: Option<TempPolicy>,
    /// HTTP/1.1 to Envoy's listener.
    http: reqwest::Client,
    /// HTTP/2 with prior knowledge (gRPC) to Envoy's listener.
    h2: reqwest::Client,
}

/// One answer Envoy gave the client.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        let mut values = self.headers.get_all(name).iter();
        let first = values.next()?;
        assert!(
            values.next().is_none(),
            "more than one {name} in the reply: {self:?}"
        );
        Some(String::from_utf8_lossy(first.as_bytes()).into_owned())
    }

    fn www_authenticate(&self) -> Option<String> {
        self.header("www-authenticate")
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the reply body is not JSON ({e}): {self:?}"))
    }
}

fn client(h2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none());
    let builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().expect("an HTTP client")
}

impl Stack {
    /// The demo policy behind `examples/envoy/<example>`.
    async fn start(example: &str) -> Self {
        Self::start_with(example, None).await
    }

    /// `policy` (or the demo policy) behind `examples/envoy/<example>`; returns once an anonymous
    /// request gets stepgate's 401 through Envoy.
    async fn start_with(example: &str, policy: Option<TempPolicy>) -> Self {
        Self::start_configured(example, policy, &[], None).await
    }

    /// The demo policy behind `examples/envoy/<example>` with `edits` made to Envoy's config.
    async fn start_edited(example: &str, edits: &[(&str, &str)]) -> Self {
        Self::start_configured(example, None, edits, None).await
    }

    /// `policy` behind `examples/envoy/<example>` with `edits`, and Envoy's upstream on
    /// `upstream` (the echo's port when `None`).
    async fn start_configured(
        example: &str,
        policy: Option<TempPolicy>,
        edits: &[(&str, &str)],
        upstream: Option<u16>,
    ) -> Self {
        let path = policy
            .as_ref()
            .map_or_else(demo_policy_path, |p| p.path.clone());
        let server = Server::start(&path).await;
        let echo = Echo::start().await;
        let upstream = upstream.unwrap_or(echo.port);
        let envoy = Envoy::start_edited(example, server.port, upstream, edits).await;
        let stack = Self {
            envoy,
            echo,
            server: Some(server),
            _policy: policy,
            http: client(false),
            h2: client(true),
        };
        stack.warm_up().await;
        stack
    }

    /// The demo policy behind `examples/envoy/<example>`, stepgate started with `args`; returns
    /// once an anonymous request gets `warm_status` through Envoy.
    async fn start_serving(example: &str, args: &[&str], warm_status: u16) -> Self {
        let server = Server::spawn_with(
            &demo_policy_path(),
            Spawn {
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                ..Spawn::default()
            },
        );
        server.wait_ready().await;
        let echo = Echo::start().await;
        let envoy = Envoy::start(example, server.port, echo.port).await;
        let stack = Self {
            envoy,
            echo,
            server: Some(server),
            _policy: None,
            http: client(false),
            h2: client(true),
        };
        stack.warm_up_to(warm_status).await;
        stack
    }

    /// Envoy in front of `stepgate_port` with no stepgate started by the stack.
    async fn without_stepgate(example: &str, stepgate_port: u16) -> Self {
        let echo = Echo::start().await;
        let envoy = Envoy::start(example, stepgate_port, echo.port).await;
        Self {
            envoy,
            echo,
            server: None,
            _policy: None,
            http: client(false),
            h2: client(true),
        }
    }

    /// Retries an anonymous request until Envoy relays stepgate's answer (the first `Check` opens
    /// Envoy's HTTP/2 connection to stepgate).
    async fn warm_up(&self) {
        self.warm_up_to(401).await;
    }

    /// [`Stack::warm_up`], until the anonymous request gets `status`.
    async fn warm_up_to(&self, status: u16) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last;
        loop {
            match self
                .http
                .get(self.envoy.url("/__warm-up"))
                .header(CASE, "warm-up")
                .send()
                .await
            {
                Ok(r) if r.status() == status => return,
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = format!("{e}"),
            }
            assert!(
                Instant::now() < deadline,
                "Envoy did not relay stepgate's {status} within 15 s (last: {last}).\n{}",
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `method path` over HTTP/1.1 with `headers` plus `x-e2e-case: case`.
    async fn send(&self, case: &str, method: Method, path: &str, headers: HeaderMap) -> Reply {
        self.send_with(&self.http, case, method, path, headers, Vec::new())
            .await
    }

    async fn send_with(
        &self,
        client: &reqwest::Client,
        case: &str,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: Vec<u8>,
    ) -> Reply {
        headers.insert(
            CASE,
            HeaderValue::from_str(case).expect("an ASCII case name"),
        );
        let response = client
            .request(method.clone(), self.envoy.url(path))
            .headers(headers)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "[{case}] {method} {} through Envoy: {e}\n{}",
                    abbreviate(path),
                    self.diagnostics()
                )
            });
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A gRPC call (HTTP/2, one empty message) to `/demo.payments.v1.Payments/Transfer`.
    async fn grpc_transfer(&self, case: &str, token: Option<&str>) -> Reply {
        let mut headers = token.map(bearer).unwrap_or_default();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        self.send_with(
            &self.h2,
            case,
            Method::POST,
            "/demo.payments.v1.Payments/Transfer",
            headers,
            vec![0, 0, 0, 0, 0],
        )
        .await
    }

    /// The requests of scenario `case` that reached the upstream.
    fn upstream(&self, case: &str) -> Vec<Recorded> {
        self.echo.requests_with(CASE, case)
    }

    /// Envoy's stderr and access log and stepgate's log, for failure messages.
    fn diagnostics(&self) -> String {
        format!(
            "--- Envoy stderr ---\n{}\n--- Envoy access log ---\n{}\n--- stepgate log (last 20 \
             lines) ---\n{}",
            tail(&self.envoy.stderr(), 40),
            tail(&self.envoy.access_log(), 40),
            self.server
                .as_ref()
                .map(|s| tail(&s.logs_text(), 20))
                .unwrap_or_else(|| "(not running)".to_owned())
        )
    }

    /// Runs one table row and checks the reply and what reached the upstream.
    async fn run(&self, case: &Case) -> Reply {
        let mut headers = case
            .token
            .as_ref()
            .map(|t| bearer(&mint(t)))
            .unwrap_or_default();
        for (name, value) in &case.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                HeaderValue::from_bytes(value).expect("a header value"),
            );
        }
        let reply = self
            .send(&case.name, case.method.clone(), &case.path, headers)
            .await;
        self.check(&case.name, &reply, &case.expect);
        reply
    }

    fn check(&self, name: &str, reply: &Reply, expect: &Expect) {
        let upstream = self.upstream(name);
        let context = || format!("[{name}] reply {reply:?}\n{}", self.diagnostics());
        match expect {
            Expect::Allow { rule } => {
                assert_eq!(reply.status, 200, "{}", context());
                assert_eq!(upstream.len(), 1, "upstream calls; {}", context());
                assert_eq!(
                    upstream[0].header_all("x-stepgate-rule"),
                    [*rule],
                    "{}",
                    context()
                );
                assert_eq!(
                    upstream[0].header_all("x-stepgate-subject"),
                    ["alice"],
                    "{}",
                    context()
                );
            }
            Expect::Deny {
                status,
                reason,
                challenge,
            } => {
                assert_eq!(reply.status, *status, "{}", context());
                assert!(
                    upstream.is_empty(),
                    "a denied request reached the upstream: {upstream:?}; {}",
                    context()
                );
                assert_eq!(
                    reply.header("content-type").as_deref(),
                    Some("application/json"),
                    "{}",
                    context()
                );
                assert_eq!(reply.json()["reason"], *reason, "{}", context());
                let www = reply.www_authenticate();
                match challenge {
                    Challenge::None => assert_eq!(www, None, "{}", context()),
                    Challenge::Exact(expected) => {
                        assert_eq!(www.as_deref(), Some(*expected), "{}", context())
                    }
                    Challenge::Params(expected) => {
                        let www = www.unwrap_or_else(|| panic!("no challenge; {}", context()));
                        let (scheme, params) = parse_challenge(&www);
                        assert_eq!(scheme, "Bearer", "{}", context());
                        for (k, v) in *expected {
                            assert_eq!(
                                param(&params, k),
                                Some(*v),
                                "auth-param {k} of {www}; {}",
                                context()
                            );
                        }
                        assert_eq!(
                            reply.json()["error"],
                            param(&params, "error").unwrap_or_default(),
                            "the body's error is the challenge's; {}",
                            context()
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario tables
// ---------------------------------------------------------------------------------------------

struct Case {
    name: String,
    method: Method,
    path: String,
    token: Option<TokenSpec>,
    /// Extra request headers, appended in order (a name may repeat).
    headers: Vec<(String, Vec<u8>)>,
    expect: Expect,
}

impl Case {
    fn new(
        name: impl Into<String>,
        method: Method,
        path: impl Into<String>,
        token: Option<TokenSpec>,
    ) -> Self {
        Self {
            name: name.into(),
            method,
            path: path.into(),
            token,
            headers: Vec::new(),
            expect: Expect::Allow {
                rule: "everything-else",
            },
        }
    }

    fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    fn header(self, name: &str, value: &str) -> Self {
        self.raw_header(name, value.as_bytes())
    }

    fn raw_header(mut self, name: &str, value: &[u8]) -> Self {
        self.headers.push((name.to_owned(), value.to_vec()));
        self
    }
}

enum Expect {
    /// 200 from the upstream, which got the request once, for subject alice under `rule`.
    Allow { rule: &'static str },
    /// stepgate's denial: `status`, the JSON body's `reason`, the challenge; upstream not reached.
    Deny {
        status: u16,
        reason: &'static str,
        challenge: Challenge,
    },
}

enum Challenge {
    /// No `WWW-Authenticate`.
    None,
    /// Exactly this `WWW-Authenticate`.
    Exact(&'static str),
    /// A Bearer challenge with (at least) these auth-params.
    Params(&'static [(&'static str, &'static str)]),
}

fn deny(status: u16, reason: &'static str, challenge: Challenge) -> Expect {
    Expect::Deny {
        status,
        reason,
        challenge,
    }
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("an ASCII token"),
    );
    headers
}

fn no_tenant() -> TokenSpec {
    TokenSpec {
        tenant: None,
        ..TokenSpec::default()
    }
}

/// An RFC 9470 (demo-oidc) token that satisfies the admin rule.
fn admin() -> TokenSpec {
    oidc(&["Admin"], Some("urn:okta:loa:2fa:any"), &["mfa"])
}

/// The no token / ordinary allow / wire step-up / two credentials table, for either header shape.
fn core_cases() -> Vec<Case> {
    vec![
        Case::new("core-no-token", Method::GET, "/accounts", None).expect(deny(
            401,
            "token_missing",
            Challenge::Exact(BARE_CHALLENGE),
        )),
        Case::new(
            "core-ordinary-allow",
            Method::GET,
            "/accounts",
            Some(TokenSpec::default()),
        ),
        Case::new(
            "core-wire-step-up",
            Method::POST,
            "/payments/wire",
            Some(entra(&[], &["cp1"])),
        )
        .expect(deny(
            401,
            "missing_auth_context",
            Challenge::Exact(ENTRA_C1_CHALLENGE),
        )),
        Case::new(
            "core-wire-allow",
            Method::POST,
            "/payments/wire",
            Some(entra(&["c1"], &["cp1"])),
        )
        .expect(Expect::Allow {
            rule: "wire-transfer",
        }),
        Case::new(
            "core-two-authorization-headers",
            Method::GET,
            "/accounts",
            Some(TokenSpec::default()),
        )
        .header("authorization", &format!("Bearer {}", mint(&no_tenant())))
        .expect(deny(
            400,
            "multiple_credentials",
            Challenge::Params(&[("realm", "stepgate-demo"), ("error", "invalid_request")]),
        )),
        // Rails (and Spring MVC up to 5.2) would serve this as the wire transfer, which the
        // catch-all would otherwise let through without the auth context.
        Case::new(
            "core-wire-extension",
            Method::POST,
            "/payments/wire.json",
            Some(entra(&[], &["cp1"])),
        )
        .expect(deny(
            400,
            "ambiguous_path",
            Challenge::Params(&[("realm", "stepgate-demo"), ("error", "invalid_request")]),
        )),
        // Some upstreams would serve this POST as a GET of the personal data.
        Case::new(
            "core-method-override",
            Method::POST,
            "/customers/42/pii",
            Some(TokenSpec::default()),
        )
        .header("x-http-method-override", "GET")
        .expect(deny(
            400,
            "malformed_request",
            Challenge::Params(&[("realm", "stepgate-demo"), ("error", "invalid_request")]),
        )),
        // Envoy forwards a header name with underscores (its default), and a WSGI or Rack
        // upstream would read this one as the subject: the examples' header_mutation filter
        // removes it before ext_authz (stepgate, asked with it, refuses the request: 400
        // malformed_request, as the engine's tests show), and the request is decided without it.
        Case::new(
            "core-identity-header-underscore",
            Method::GET,
            "/accounts",
            Some(TokenSpec::default()),
        )
        .header("x_stepgate_subject", "mallory")
        .expect(Expect::Allow {
            rule: "everything-else",
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// WWW-Authenticate parsing (as a client library does it)
// ---------------------------------------------------------------------------------------------

/// Splits `Scheme name=value, name="quoted, \"value\"", …` into the scheme and its auth-params.
fn parse_challenge(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        assert_eq!(
            chars.next(),
            Some('='),
            "auth-param {name:?} without `=` in {header}"
        );
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => value.push(chars.next().expect("an escaped character")),
                    Some(c) => value.push(c),
                    None => panic!("unterminated quoted string in {header}"),
                }
            }
        } else {
            value =
                std::iter::from_fn(|| chars.next_if(|c| *c != ',' && !c.is_whitespace())).collect();
        }
        let name = name.trim().to_ascii_lowercase();
        assert!(
            params.iter().all(|(n, _)| *n != name),
            "auth-param {name} twice in {header}"
        );
        params.push((name, value));
    }
    (scheme.to_owned(), params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The `claims` of an Entra claims challenge, decoded as MSAL does (standard base64) and parsed.
fn decoded_claims(www: &str) -> serde_json::Value {
    let (scheme, params) = parse_challenge(www);
    assert_eq!(scheme, "Bearer");
    let claims = param(&params, "claims").unwrap_or_else(|| panic!("no claims in {www}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(claims)
        .unwrap_or_else(|e| panic!("claims {claims:?} is not standard base64: {e}"));
    serde_json::from_slice(&bytes).expect("the claims are JSON")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn abbreviate(path: &str) -> String {
    if path.len() > 80 {
        format!("{}… ({} bytes)", &path[..80], path.len())
    } else {
        path.to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: decisions through Envoy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_request_gets_bare_bearer_401_and_never_reaches_the_upstream() {
    let stack = Stack::start(ENVOY_YAML).await;
    let reply = stack
        .run(
            &Case::new("anonymous", Method::GET, "/accounts", None).expect(deny(
                401,
                "token_missing",
                Challenge::Exact(BARE_CHALLENGE),
            )),
        )
        .await;
    assert_eq!(reply.json()["error"], "unauthorized", "{reply:?}");
    // Nothing but Envoy's warm-up and this request was sent, and neither got through.
    assert!(
        stack.echo.requests().is_empty(),
        "{:?}",
        stack.echo.requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_request_reaches_the_upstream_with_identity_headers_replacing_spoofed_ones() {
    // As the example is, and without its header_mutation backstop: stepgate's own removals.
    for backstop in [true, false] {
        let stack = if backstop {
            Stack::start(ENVOY_YAML).await
        } else {
            Stack::start_edited(ENVOY_YAML, &[(BACKSTOP_REGEX, "x-backstop-off-.*")]).await
        };
        spoofed_identity_headers_never_reach_the_upstream(&stack, backstop).await;
    }
}

/// A route matching an identity header follows stepgate's value, not a client's spoofed one:
/// Envoy picks the route from the client's headers before any filter runs, and the example's
/// ext_authz (`clear_route_cache: true`) has it picked again once stepgate has set its headers.
/// Without that setting the client's value chooses the route (the control).
#[tokio::test(flavor = "multi_thread")]
async fn a_route_matching_an_identity_header_follows_stepgates_value() {
    const CATCH_ALL: &str = r#"                        - match: { prefix: "/" }
                          route: { cluster: upstream }"#;
    let tenant_route = format!(
        r#"                        - match: {{ prefix: "/", headers: [{{ name: x-stepgate-tenant, string_match: {{ exact: acme }} }}] }}
                          route: {{ cluster: upstream }}
                          request_headers_to_add: [{{ header: {{ key: x-route, value: acme }} }}]
{CATCH_ALL}"#
    );
    for cleared in [true, false] {
        let mut edits = vec![(CATCH_ALL, tenant_route.as_str())];
        if !cleared {
            edits.push(("clear_route_cache: true", "clear_route_cache: false"));
        }
        let stack = Stack::start_edited(ENVOY_YAML, &edits).await;
        let name = if cleared {
            "route-cleared"
        } else {
            "route-kept"
        };
        let token = mint(&TokenSpec::default());
        let case = Case::new(name, Method::GET, "/accounts", None)
            .header("authorization", &format!("Bearer {token}"))
            .header("x-stepgate-tenant", "acme");
        stack.run(&case).await;
        let seen = &stack.upstream(name)[0];
        let context = format!("[{name}] upstream saw {seen:?}\n{}", stack.diagnostics());
        assert_eq!(
            seen.header_all("x-stepgate-tenant"),
            [DEMO_TENANT],
            "{context}"
        );
        let routed = seen.header_all("x-route");
        if cleared {
            assert!(
                routed.is_empty(),
                "the client's value chose the route: {context}"
            );
        } else {
            assert_eq!(routed, ["acme"], "the control: {context}");
        }
    }
}

/// The example Envoy configs' regex of the headers their `header_mutation` filter removes.
const BACKSTOP_REGEX: &str = "x[-_]stepgate[-_].*";

async fn spoofed_identity_headers_never_reach_the_upstream(stack: &Stack, backstop: bool) {
    let spoofed: &[(&str, &str)] = &[
        ("x-stepgate-subject", "mallory"),
        ("x-stepgate-subject", "eve"),
        ("x-stepgate-tenant", "evil-tenant"),
        ("x-stepgate-auth-contexts", "c1 c2 c3"),
        ("x-stepgate-rule", "wire-transfer"),
        // Named like stepgate's, though the policy does not set them.
        ("x-stepgate-roles", "Admin"),
        ("x_stepgate_roles", "Admin"),
        ("X-Stepgate_Roles2", "Admin"),
    ];
    for (name, spec, tenant) in [
        ("with-tid", TokenSpec::default(), Some(DEMO_TENANT)),
        ("without-tid", no_tenant(), None),
    ] {
        let name = &format!("{name}-{}", if backstop { "backstop" } else { "stepgate" });
        let token = mint(&spec);
        let mut case = Case::new(name, Method::GET, "/accounts", None)
            .header("authorization", &format!("Bearer {token}"));
        for (k, v) in spoofed {
            case = case.header(k, v);
        }
        let reply = stack.run(&case).await;
        let seen = &stack.upstream(name)[0];
        let context = format!("[{name}] upstream saw {seen:?}\n{}", stack.diagnostics());
        for (k, v) in spoofed {
            assert!(
                !seen.header_all(k).iter().any(|got| got == v),
                "the client's {k}: {v} reached the upstream; {context}"
            );
        }
        for h in IDENTITY_HEADERS {
            assert!(
                seen.header_all(h).len() <= 1,
                "{h} more than once; {context}"
            );
        }
        assert_eq!(
            seen.header_all("x-stepgate-subject"),
            ["alice"],
            "{context}"
        );
        assert_eq!(
            seen.header_all("x-stepgate-tenant"),
            tenant.into_iter().collect::<Vec<_>>(),
            "{context}"
        );
        assert_eq!(
            seen.header_all("x-stepgate-rule"),
            ["everything-else"],
            "{context}"
        );
        assert!(
            seen.header_all("x-stepgate-auth-contexts").is_empty(),
            "a token without acrs: {context}"
        );
        // remove_authorization: false in the demo policy: the token goes upstream as sent.
        assert_eq!(
            seen.header_all("authorization"),
            [format!("Bearer {token}")],
            "{context}"
        );
        assert_eq!(seen.path, "/accounts", "{context}");
        // The echo's JSON body made it back through Envoy.
        let body = reply.json();
        assert_eq!(
            body["headers"]["x-stepgate-subject"],
            serde_json::json!(["alice"])
        );
    }
    if !backstop {
        // Without the backstop, stepgate itself refuses a configured identity header spelled
        // with `_`, which WSGI, Rack and PHP upstreams read as that header.
        let token = mint(&TokenSpec::default());
        let case = Case::new("underscore-stepgate", Method::GET, "/accounts", None)
            .header("authorization", &format!("Bearer {token}"))
            .header("x_stepgate_subject", "mallory")
            .expect(deny(
                400,
                "malformed_request",
                Challenge::Params(&[("realm", "stepgate-demo"), ("error", "invalid_request")]),
            ));
        stack.run(&case).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_authorization_policy_keeps_the_token_from_the_upstream() {
    let text = edit(
        &demo_policy_text(),
        "remove_authorization: false",
        "remove_authorization: true",
    );
    let policy = TempPolicy::new("envoy-remove-authorization", &text);
    let stack = Stack::start_with(ENVOY_YAML, Some(policy)).await;
    stack
        .run(&Case::new(
            "remove-authorization",
            Method::GET,
            "/accounts",
            Some(TokenSpec::default()),
        ))
        .await;
    let seen = &stack.upstream("remove-authorization")[0];
    assert!(
        seen.header_all("authorization").is_empty(),
        "authorization reached the upstream: {seen:?}"
    );
    assert_eq!(seen.header_all("x-stepgate-tenant"), [DEMO_TENANT]);
}

/// Envoy picks its virtual host with the port as sent: `www.example.com:8443` is not the
/// `www.example.com` virtual host but the `*` one, the API. A policy that lets anonymous callers
/// reach the public site must not let that request through to the API.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_on_the_public_hosts_name_does_not_reach_the_api_anonymously() {
    let text = edit(
        &demo_policy_text(),
        "  - id: health\n",
        "  - id: www-public\n    match: { hosts: [www.example.com] }\n    allow_anonymous: true\n  - id: health\n",
    );
    let policy = TempPolicy::new("envoy-www-public", &text);
    // A virtual host of its own for the public site, marked for the upstream to see.
    let www = (
        "                    - name: app\n                      domains: [\"*\"]\n",
        "                    - name: www\n                      domains: [\"www.example.com\"]\n                      request_headers_to_add:\n                        - header: { key: x-vhost, value: www }\n                      routes:\n                        - match: { prefix: \"/\" }\n                          route: { cluster: upstream }\n                    - name: app\n                      domains: [\"*\"]\n",
    );
    let stack = Stack::start_configured(ENVOY_YAML, Some(policy), &[www], None).await;
    let with_host = |host: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::HOST,
            HeaderValue::from_str(host).expect("an ASCII host"),
        );
        headers
    };

    let reply = stack
        .send(
            "www",
            Method::GET,
            "/index.html",
            with_host("www.example.com"),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", stack.diagnostics());
    let seen = stack.upstream("www");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].header_all("x-vhost"),
        ["www"],
        "served by the www virtual host"
    );

    for (i, host) in ["www.example.com:8443", "www.example.com."]
        .into_iter()
        .enumerate()
    {
        let case = format!("www-port-{i}");
        let reply = stack
            .send(&case, Method::GET, "/admin/users", with_host(host))
            .await;
        assert!(
            stack.upstream(&case).is_empty(),
            "Host {host} reached the upstream anonymously: {reply:?}\n{}",
            stack.diagnostics()
        );
        assert_eq!(
            reply.status,
            400,
            "{host}: {reply:?}\n{}",
            stack.diagnostics()
        );
        assert_eq!(reply.json()["reason"], "ambiguous_host", "{reply:?}");
    }

    // A header through which an upstream framework would read another host than Envoy routed
    // on (Spring, Rack and Jetty read `Forwarded`; Express and Django `X-Forwarded-Host`):
    // refused before the public rule can let it through anonymously. Envoy passes each as sent.
    for (i, (name, value)) in [
        ("forwarded", "for=192.0.2.1;host=admin.example.com"),
        ("forwarded", "for=192.0.2.1, \"host\"=admin.example.com"),
        ("forwarded", "host = admin.example.com"),
        ("x-forwarded-host", "admin.example.com"),
    ]
    .into_iter()
    .enumerate()
    {
        let case = format!("www-forwarded-{i}");
        let mut headers = with_host("www.example.com");
        headers.insert(name, HeaderValue::from_static(value));
        let reply = stack
            .send(&case, Method::GET, "/admin/users", headers)
            .await;
        assert!(
            stack.upstream(&case).is_empty(),
            "{name}: {value} reached the upstream anonymously: {reply:?}\n{}",
            stack.diagnostics()
        );
        assert_eq!(reply.status, 400, "{name}: {value}: {reply:?}");
        assert_eq!(reply.json()["reason"], "malformed_request", "{reply:?}");
    }
    // Naming the host Envoy routed on, it is decided as before.
    let mut headers = with_host("www.example.com");
    headers.insert(
        "forwarded",
        HeaderValue::from_static("for=192.0.2.1;host=\"www.example.com\";proto=https"),
    );
    let reply = stack
        .send("www-forwarded-same", Method::GET, "/index.html", headers)
        .await;
    assert_eq!(reply.status, 200, "{reply:?}\n{}", stack.diagnostics());
}

#[tokio::test(flavor = "multi_thread")]
async fn wire_transfer_without_auth_context_c1_gets_the_entra_claims_challenge() {
    let stack = Stack::start(ENVOY_YAML).await;
    let too_old = TokenSpec {
        auth_age: Some(20 * 60),
        ..entra(&["c1"], &["cp1"])
    };
    let cases = [
        Case::new(
            "wire-cp1-without-c1",
            Method::POST,
            "/payments/wire",
            Some(entra(&[], &["cp1"])),
        )
        .expect(deny(
            401,
            "missing_auth_context",
            Challenge::Exact(ENTRA_C1_CHALLENGE),
        )),
        Case::new(
            "wire-c1-sign-in-too-old",
            Method::POST,
            "/payments/wire",
            Some(too_old),
        )
        .expect(deny(
            401,
            "auth_too_old",
            Challenge::Exact(ENTRA_C1_CHALLENGE),
        )),
        Case::new(
            "wire-without-cp1",
            Method::POST,
            "/payments/wire",
            Some(entra(&[], &[])),
        )
        .expect(deny(403, "client_not_capable", Challenge::None)),
        Case::new(
            "wire-with-c1",
            Method::POST,
            "/payments/wire",
            Some(entra(&["c1"], &["cp1"])),
        )
        .expect(Expect::Allow {
            rule: "wire-transfer",
        }),
    ];
    for case in &cases {
        let reply = stack.run(case).await;
        if let Some(www) = reply.www_authenticate() {
            // What MSAL does with it: split the auth-params, decode `claims`, send it to Entra.
            let (_, params) = parse_challenge(&www);
            assert_eq!(param(&params, "realm"), Some(""));
            assert_eq!(
                param(&params, "authorization_uri"),
                Some("https://login.microsoftonline.com/common/oauth2/authorize")
            );
            assert_eq!(param(&params, "error"), Some("insufficient_claims"));
            assert_eq!(
                decoded_claims(&www),
                serde_json::from_str::<serde_json::Value>(C1_CLAIMS_JSON).unwrap(),
                "[{}]",
                case.name
            );
            assert_eq!(reply.json()["error"], "insufficient_claims");
        }
    }
    let allowed = &stack.upstream("wire-with-c1")[0];
    assert_eq!(allowed.method, "POST");
    assert_eq!(allowed.header_all("x-stepgate-auth-contexts"), ["c1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_route_steps_up_with_the_rfc9470_challenge_and_checks_roles_first() {
    let stack = Stack::start(ENVOY_YAML).await;
    const STEP_UP: &[(&str, &str)] = &[
        ("realm", "stepgate-demo"),
        ("error", "insufficient_user_authentication"),
        ("acr_values", "urn:okta:loa:2fa:any phr"),
        ("max_age", "3600"),
    ];
    let cases = [
        Case::new(
            "admin-acr-too-weak",
            Method::GET,
            "/admin/users",
            Some(oidc(&["Admin"], Some("urn:okta:loa:1fa:pwd"), &["mfa"])),
        )
        .expect(deny(401, "acr_not_accepted", Challenge::Params(STEP_UP))),
        Case::new(
            "admin-sign-in-too-old",
            Method::GET,
            "/admin/users",
            Some(TokenSpec {
                auth_age: Some(2 * 3600),
                ..admin()
            }),
        )
        .expect(deny(401, "auth_too_old", Challenge::Params(STEP_UP))),
        Case::new(
            "admin-missing-role",
            Method::GET,
            "/admin/users",
            Some(oidc(&[], Some("urn:okta:loa:2fa:any"), &["mfa"])),
        )
        .expect(deny(
            403,
            "missing_role",
            Challenge::Params(&[("realm", "stepgate-demo"), ("error", "insufficient_scope")]),
        )),
        Case::new("admin-ok", Method::GET, "/admin/users", Some(admin()))
            .expect(Expect::Allow { rule: "admin" }),
    ];
    for case in &cases {
        stack.run(case).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_through_envoy_get_grpc_status_16_with_the_challenge_or_reach_the_upstream() {
    let stack = Stack::start(ENVOY_YAML).await;
    let cases: [(&str, Option<TokenSpec>, &str, Option<&str>); 4] = [
        ("grpc-no-token", None, "16", Some(BARE_CHALLENGE)),
        (
            "grpc-cp1-without-c1",
            Some(entra(&[], &["cp1"])),
            "16",
            Some(ENTRA_C1_CHALLENGE),
        ),
        ("grpc-without-cp1", Some(entra(&[], &[])), "7", None),
        ("grpc-with-c1", Some(entra(&["c1"], &["cp1"])), "0", None),
    ];
    for (name, spec, grpc_status, www) in cases {
        let token = spec.as_ref().map(mint);
        let reply = stack.grpc_transfer(name, token.as_deref()).await;
        let context = format!("[{name}] {reply:?}\n{}", stack.diagnostics());
        assert_eq!(reply.status, 200, "gRPC answers are HTTP 200; {context}");
        assert_eq!(
            reply.header("grpc-status").as_deref(),
            Some(grpc_status),
            "{context}"
        );
        assert_eq!(reply.www_authenticate().as_deref(), www, "{context}");
        let upstream = stack.upstream(name);
        if grpc_status == "0" {
            assert_eq!(upstream.len(), 1, "{context}");
            let seen = &upstream[0];
            assert_eq!(seen.path, "/demo.payments.v1.Payments/Transfer");
            assert_eq!(seen.version, "HTTP/2.0", "grpc_upstream speaks h2c");
            assert_eq!(seen.header_all("content-type"), ["application/grpc"]);
            assert_eq!(seen.header_all("x-stepgate-rule"), ["wire-transfer"]);
            assert_eq!(seen.body_len, 5, "the empty gRPC message frame");
        } else {
            assert!(upstream.is_empty(), "denied but reached: {context}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: stepgate unavailable
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn stepgate_stopped_makes_envoy_answer_503_without_reaching_the_upstream() {
    let mut stack = Stack::start(ENVOY_YAML).await;
    stack
        .run(&Case::new(
            "before-stop",
            Method::GET,
            "/accounts",
            Some(TokenSpec::default()),
        ))
        .await;
    drop(stack.server.take()); // kills and reaps stepgate
    for (name, spec) in [
        ("stopped-ordinary", TokenSpec::default()),
        ("stopped-wire-with-c1", entra(&["c1"], &["cp1"])),
    ] {
        let path = if name.contains("wire") {
            "/payments/wire"
        } else {
            "/accounts"
        };
        let reply = stack
            .send(name, Method::POST, path, bearer(&mint(&spec)))
            .await;
        assert_eq!(
            reply.status,
            503,
            "[{name}] {reply:?}\n{}",
            stack.diagnostics()
        );
        assert!(stack.upstream(name).is_empty(), "[{name}] reached upstream");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_check_from_leaving_envoy_out_every_request_is_refused_and_naming_it_they_are_decided()
{
    // Envoy connects to stepgate from 127.0.0.1.
    let refused = Stack::start_serving(ENVOY_YAML, &["--check-from", "127.0.0.2"], 403).await;
    refused
        .run(
            &Case::new(
                "not-a-listed-caller",
                Method::GET,
                "/accounts",
                Some(TokenSpec::default()),
            )
            .expect(deny(403, "caller_not_allowed", Challenge::None)),
        )
        .await;
    drop(refused);
    let decided =
        Stack::start_serving(ENVOY_YAML, &["--check-from", "10.0.0.0/8,127.0.0.0/8"], 401).await;
    decided
        .run(&Case::new(
            "a-listed-caller",
            Method::GET,
            "/accounts",
            Some(TokenSpec::default()),
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stepgate_slower_than_the_envoy_timeout_makes_envoy_answer_503() {
    let silent = Silent::start().await;
    let stack = Stack::without_stepgate(ENVOY_YAML, silent.port).await;
    let reply = stack
        .send(
            "silent-authorizer",
            Method::GET,
            "/accounts",
            bearer(&mint(&TokenSpec::default())),
        )
        .await;
    assert_eq!(reply.status, 503, "{reply:?}\n{}", stack.diagnostics());
    assert!(stack.upstream("silent-authorizer").is_empty());
    assert!(
        silent.accepted() >= 1,
        "Envoy never connected to the silent authorizer: the 503 was not a timeout"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stepgate_unreachable_from_the_start_makes_envoy_answer_503() {
    let closed = free_port();
    let stack = Stack::without_stepgate(ENVOY_YAML, closed).await;
    let reply = stack
        .send(
            "closed-port",
            Method::GET,
            "/accounts",
            bearer(&mint(&TokenSpec::default())),
        )
        .await;
    assert_eq!(reply.status, 503, "{reply:?}\n{}", stack.diagnostics());
    assert!(stack.upstream("closed-port").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Tests: the access log, odd requests, raw headers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn access_log_carries_stepgate_outcome_reason_rule_and_token_fingerprint() {
    let stack = Stack::start(ENVOY_YAML).await;
    stack
        .send(
            "log-deny",
            Method::GET,
            "/ledger/log-deny",
            HeaderMap::new(),
        )
        .await;
    let token = mint(&TokenSpec::default());
    let reply = stack
        .send(
            "log-allow",
            Method::GET,
            "/ledger/log-allow",
            bearer(&token),
        )
        .await;
    assert_eq!(reply.status, 200);
    let fingerprint: String = Sha256::digest(token.as_bytes())[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let deny = stack
        .envoy
        .wait_for_access_log(ACCESS_LOG_DEADLINE, |l| {
            l.starts_with("GET /ledger/log-deny ")
        })
        .await
        .unwrap_or_else(|| panic!("no access log line for the denial\n{}", stack.diagnostics()));
    assert!(
        deny.starts_with("GET /ledger/log-deny 401 outcome=DENY reason=token_missing "),
        "{deny}"
    );
    assert!(
        deny.ends_with("token=- shadow=- block=-"),
        "no token, no fingerprint, no shadow, no block: {deny}"
    );

    let allow = stack
        .envoy
        .wait_for_access_log(ACCESS_LOG_DEADLINE, |l| {
            l.starts_with("GET /ledger/log-allow ")
        })
        .await
        .unwrap_or_else(|| panic!("no access log line for the allow\n{}", stack.diagnostics()));
    assert_eq!(
        allow,
        format!(
            "GET /ledger/log-allow 200 outcome=ALLOW reason=allowed rule=everything-else \
             token={fingerprint} shadow=- block=-"
        )
    );
    assert!(
        !stack.envoy.access_log().contains(&token),
        "the token leaked into the access log"
    );

    // A token in the query: stepgate refuses it, and the log names the path without its query.
    let reply = stack
        .send(
            "log-query",
            Method::GET,
            &format!("/ledger/log-query?access_token={token}"),
            HeaderMap::new(),
        )
        .await;
    assert_eq!(reply.status, 400);
    let line = stack
        .envoy
        .wait_for_access_log(ACCESS_LOG_DEADLINE, |l| {
            l.starts_with("GET /ledger/log-query ")
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no access log line for the query token\n{}",
                stack.diagnostics()
            )
        });
    assert!(
        line.starts_with("GET /ledger/log-query 400 outcome=DENY reason=malformed_authorization "),
        "{line}"
    );
    assert!(
        !stack.envoy.access_log().contains(&token),
        "a query token leaked into the access log"
    );

    // A client's own `x-envoy-original-path` does not reach the log: the log names `:path`, and
    // the edge listener removes the x-envoy-* headers it is sent (`use_remote_address`).
    let mut forged = HeaderMap::new();
    forged.insert("x-envoy-original-path", "/healthz".parse().unwrap());
    let reply = stack
        .send("log-forged", Method::GET, "/ledger/log-forged", forged)
        .await;
    assert_eq!(reply.status, 401);
    let line = stack
        .envoy
        .wait_for_access_log(ACCESS_LOG_DEADLINE, |l| {
            l.starts_with("GET /ledger/log-forged ") || l.starts_with("GET /healthz 401 ")
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no access log line for the request\n{}",
                stack.diagnostics()
            )
        });
    assert!(
        line.starts_with("GET /ledger/log-forged 401 "),
        "the access log shows the path the client sent, not one it named: {line}"
    );
}

/// Extra headers a client may add and still get a clean decision with a valid token: below
/// Envoy's `max_headers_count` (100) once Envoy's own and stepgate's identity headers are added.
const EXTRA_HEADERS_WITH_TOKEN: usize = 80;

/// Extra headers near Envoy's limit (the request itself stays under 100 headers).
const EXTRA_HEADERS_NEAR_LIMIT: usize = 90;

fn with_extra_headers(mut case: Case, count: usize) -> Case {
    for i in 0..count {
        case = case.header(&format!("x-extra-{i:02}"), &format!("value-{i}"));
    }
    case
}

/// Odd header bytes, an 8 KiB path and many extra headers get stepgate's decision (never a 5xx),
/// and stepgate answers normally afterwards.
async fn odd_requests_get_clean_decisions(example: &str) {
    let mut stack = Stack::start(example).await;
    let odd: Vec<u8> = b"odd:".iter().copied().chain(0x80..=0xFF).collect();
    let long_path = format!("/accounts/{}", "a".repeat(8192));
    let anonymous = || deny(401, "token_missing", Challenge::Exact(BARE_CHALLENGE));
    let token = || Some(TokenSpec::default());
    let cases = [
        Case::new("odd-bytes-anonymous", Method::GET, "/accounts", None)
            .raw_header("x-odd", &odd)
            .expect(anonymous()),
        Case::new("odd-bytes-token", Method::GET, "/accounts", token()).raw_header("x-odd", &odd),
        Case::new("long-path-anonymous", Method::GET, &long_path, None).expect(anonymous()),
        Case::new("long-path-token", Method::GET, &long_path, token()),
        with_extra_headers(
            Case::new("many-headers-anonymous", Method::GET, "/accounts", None),
            EXTRA_HEADERS_NEAR_LIMIT,
        )
        .expect(anonymous()),
        with_extra_headers(
            Case::new("many-headers-token", Method::GET, "/accounts", token()),
            EXTRA_HEADERS_WITH_TOKEN,
        ),
    ];
    for case in &cases {
        stack.run(case).await;
    }
    let seen = &stack.upstream("odd-bytes-token")[0];
    assert_eq!(
        seen.header_raw("x-odd"),
        [odd],
        "odd bytes reach the upstream intact"
    );
    assert_eq!(
        stack.upstream("long-path-token")[0].path,
        long_path,
        "the long path reaches the upstream whole"
    );
    // stepgate is still there and still deciding.
    let server = stack.server.as_mut().expect("stepgate");
    assert!(
        server.wait_exit(Duration::ZERO).await.is_none(),
        "stepgate exited:\n{}",
        server.logs_text()
    );
    stack
        .run(
            &Case::new("after-anonymous", Method::GET, "/accounts", None).expect(deny(
                401,
                "token_missing",
                Challenge::Exact(BARE_CHALLENGE),
            )),
        )
        .await;
    stack
        .run(&Case::new(
            "after-token",
            Method::GET,
            "/accounts",
            Some(TokenSpec::default()),
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_bytes_long_paths_and_many_headers_get_clean_decisions_with_merged_headers() {
    odd_requests_get_clean_decisions(ENVOY_YAML).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn odd_bytes_long_paths_and_many_headers_get_clean_decisions_with_raw_header_map() {
    odd_requests_get_clean_decisions(ENVOY_RAW_HEADERS_YAML).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn core_decisions_hold_with_merged_headers() {
    let stack = Stack::start(ENVOY_YAML).await;
    for case in &core_cases() {
        stack.run(case).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn core_decisions_hold_with_raw_header_map() {
    let stack = Stack::start(ENVOY_RAW_HEADERS_YAML).await;
    for case in &core_cases() {
        stack.run(case).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_near_envoys_header_limit_get_200_or_431_never_a_5xx() {
    // stepgate knows Envoy's max_headers_count (policy `upstream.max_request_headers`, default 100)
    // and answers 431 when its identity headers would push an allowed request over it, instead of
    // the 500 Envoy would send.
    let stack = Stack::start(ENVOY_YAML).await;
    let token = mint(&TokenSpec::default());
    let mut statuses = Vec::new();
    for extra in 80..=99 {
        let mut headers = bearer(&token);
        for i in 0..extra {
            headers.append(
                HeaderName::from_bytes(format!("x-extra-{i:02}").as_bytes()).unwrap(),
                HeaderValue::from_str(&format!("value-{i}")).unwrap(),
            );
        }
        let name = format!("near-limit-{extra}");
        let reply = stack.send(&name, Method::GET, "/accounts", headers).await;
        assert!(
            reply.status == 200 || reply.status == 431,
            "{extra} extra headers: {reply:?}\n{}",
            stack.diagnostics()
        );
        let reached = stack.upstream(&name).len();
        // A 431 comes from stepgate (JSON, reason too_many_headers) while the request itself fits
        // Envoy's limit, and from Envoy (plain text) once it does not.
        let answer = match reply.status {
            200 => "allowed",
            _ if reply.body.contains("too_many_headers") => "stepgate-431",
            _ => "envoy-431",
        };
        if reply.status == 200 {
            assert_eq!(reached, 1, "an allowed request reaches the upstream");
        } else {
            assert_eq!(reached, 0, "a 431 never reaches the upstream");
        }
        statuses.push(answer);
    }
    assert_eq!(statuses[0], "allowed", "80 extra headers fit: {statuses:?}");
    assert!(
        statuses.contains(&"stepgate-431"),
        "stepgate refuses before Envoy would fail with 500: {statuses:?}"
    );
    let rank = |a: &&str| {
        ["allowed", "stepgate-431", "envoy-431"]
            .iter()
            .position(|x| x == a)
    };
    assert!(
        statuses.iter().map(rank).is_sorted(),
        "allowed, then stepgate's 431, then Envoy's: {statuses:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Paths and bytes that servers read differently
// ---------------------------------------------------------------------------------------------

/// Envoy as shipped normalises paths; without it (Envoy's default) it routes and forwards the
/// path as sent.
const NO_PATH_NORMALISATION: (&str, &str) = ("normalize_path: true", "normalize_path: false");
const FAIL_OPEN: (&str, &str) = ("failure_mode_allow: false", "failure_mode_allow: true");

/// `/admin/..;/healthz` is `/healthz` to Tomcat and Spring and `/admin/..;/healthz` (served from
/// `/admin`) to Go, Node and nginx: whichever way Envoy is set up, it never reaches the upstream
/// as a path under `/admin` without a token.
#[tokio::test(flavor = "multi_thread")]
async fn a_path_with_dot_parameter_segments_never_reaches_admin_without_a_token() {
    for edits in [&[][..], &[NO_PATH_NORMALISATION][..]] {
        let stack = Stack::start_edited(ENVOY_YAML, edits).await;
        for (i, path) in [
            "/admin/..;/healthz",
            "/admin/.;/healthz",
            "/admin/%2e%2e;/healthz",
        ]
        .into_iter()
        .enumerate()
        {
            let case = format!("dot-params-{i}");
            let reply = stack.send(&case, Method::GET, path, HeaderMap::new()).await;
            let under_admin: Vec<String> = stack
                .upstream(&case)
                .into_iter()
                .map(|r| r.path)
                .filter(|p| p.to_ascii_lowercase().starts_with("/admin"))
                .collect();
            assert!(
                under_admin.is_empty(),
                "{path} (edits {edits:?}) reached the upstream as {under_admin:?}: {reply:?}\n{}",
                stack.diagnostics()
            );
            if !edits.is_empty() {
                // Forwarded as sent, so stepgate refuses it rather than decide on one reading.
                assert_eq!(
                    reply.status,
                    400,
                    "{path}: {reply:?}\n{}",
                    stack.diagnostics()
                );
            }
        }
    }
}

/// `/%68ealthz` and `//healthz` are the public `/healthz` decoded and merged, and other routes to
/// an upstream that routes the path as sent (Express). Envoy as shipped (`normalize_path` and
/// `merge_slashes`) cleans them before stepgate and the upstream see them, so both read
/// `/healthz`; without either, stepgate refuses them and they never reach the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn encoded_letters_and_empty_segments_are_read_one_way_or_refused() {
    const NO_MERGE_SLASHES: (&str, &str) = ("merge_slashes: true", "merge_slashes: false");
    for edits in [&[][..], &[NO_PATH_NORMALISATION, NO_MERGE_SLASHES][..]] {
        let stack = Stack::start_edited(ENVOY_YAML, edits).await;
        for (i, path) in ["/%68ealthz", "//healthz"].into_iter().enumerate() {
            let case = format!("raw-spelling-{i}");
            let reply = stack.send(&case, Method::GET, path, HeaderMap::new()).await;
            let reached: Vec<String> = stack.upstream(&case).into_iter().map(|r| r.path).collect();
            if edits.is_empty() {
                assert_eq!(
                    (reply.status, reached.as_slice()),
                    (200, &["/healthz".to_owned()][..]),
                    "{path}: {reply:?}\n{}",
                    stack.diagnostics()
                );
            } else {
                assert_eq!(
                    (reply.status, reached.as_slice()),
                    (400, &[][..]),
                    "{path}: {reply:?}\n{}",
                    stack.diagnostics()
                );
                assert!(reply.body.contains("invalid_path"), "{path}: {reply:?}");
            }
        }
    }
}

/// Sends GET `path` (raw bytes) over HTTP/2 to Envoy with the `h2` library of the project's
/// .venv (no URL can hold a raw 0xFF); the status Envoy answered.
fn raw_h2_get(port: u16, path: &[u8], headers: &[(&str, &str)]) -> String {
    let python = common::manifest_dir().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "the raw HTTP/2 requests need the project's .venv with h2: run ./scripts/setup-peers"
    );
    let hex: String = path.iter().map(|b| format!("{b:02x}")).collect();
    let output = std::process::Command::new(python)
        .arg(common::manifest_dir().join("tests/raw_h2_request.py"))
        .arg(port.to_string())
        .arg(hex)
        .args(headers.iter().map(|(k, v)| format!("{k}={v}")))
        .output()
        .expect("running tests/raw_h2_request.py");
    assert!(
        output.status.success(),
        "tests/raw_h2_request.py failed (is h2 in .venv? run ./scripts/setup-peers): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// `tests/lenient_upstream.py`: an upstream that serves raw path bytes (as Go, Node and Python's
/// servers do; the hyper echo refuses them), recording each request line by its case.
struct LenientUpstream {
    child: std::process::Child,
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl LenientUpstream {
    fn start() -> Self {
        use std::io::BufRead as _;
        let python = common::manifest_dir().join(".venv/bin/python");
        assert!(
            python.is_file(),
            "the lenient upstream needs the project's .venv: run ./scripts/setup-peers"
        );
        let mut child = std::process::Command::new(python)
            .arg(common::manifest_dir().join("tests/lenient_upstream.py"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting tests/lenient_upstream.py");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let port = lines
            .next()
            .and_then(Result::ok)
            .and_then(|l| l.strip_prefix("port ")?.parse().ok())
            .expect("the lenient upstream prints its port");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&seen);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, port, seen }
    }

    /// The request lines (hex) served for `case`.
    fn served(&self, case: &str) -> Vec<String> {
        let prefix = format!("request {case} ");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }
}

impl Drop for LenientUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `failure_mode_allow: true` an error from stepgate lets the request through, so a path
/// byte stepgate cannot read must be a denial. Envoy shows stepgate a non-UTF-8 path byte as `!`
/// (or, normalising, as `%FF`) but forwards the byte itself, and an upstream such as Go's, Node's
/// or Python's serves it: with or without a token, it is refused, never a 200.
#[tokio::test(flavor = "multi_thread")]
async fn with_failure_mode_allow_a_raw_non_utf8_path_byte_is_never_200() {
    let token = format!("Bearer {}", mint(&TokenSpec::default()));
    let upstream = LenientUpstream::start();
    for (example, edits) in [
        (ENVOY_YAML, &[FAIL_OPEN][..]),
        (ENVOY_RAW_HEADERS_YAML, &[FAIL_OPEN][..]),
        (
            ENVOY_RAW_HEADERS_YAML,
            &[FAIL_OPEN, NO_PATH_NORMALISATION][..],
        ),
    ] {
        let stack = Stack::start_configured(example, None, edits, Some(upstream.port)).await;
        let port = stack.envoy.ports.listener;
        for (i, path) in [&b"/a\xffb"[..], b"/accounts/\xff", b"/healthz\xc0\xaf"]
            .into_iter()
            .enumerate()
        {
            for authorization in [None, Some(token.as_str())] {
                let case = format!("raw-byte-{i}-{}-{}", authorization.is_some(), edits.len());
                let mut headers = vec![(CASE.to_owned(), case.clone())];
                headers.extend(authorization.map(|a| ("authorization".to_owned(), a.to_owned())));
                let status = tokio::task::spawn_blocking({
                    let path = path.to_vec();
                    move || {
                        let headers: Vec<(&str, &str)> = headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        raw_h2_get(port, &path, &headers)
                    }
                })
                .await
                .unwrap();
                assert_ne!(
                    status,
                    "200",
                    "{example} {edits:?}: {path:?} (token: {}) got 200\n{}",
                    authorization.is_some(),
                    stack.diagnostics()
                );
                assert!(
                    upstream.served(&case).is_empty(),
                    "{example} {edits:?}: {path:?} was served upstream: {:?}",
                    upstream.served(&case)
                );
            }
        }
    }
    // The upstream does serve what stepgate allows.
    let stack = Stack::start_configured(ENVOY_YAML, None, &[FAIL_OPEN], Some(upstream.port)).await;
    let status = tokio::task::spawn_blocking({
        let port = stack.envoy.ports.listener;
        let token = token.clone();
        move || {
            raw_h2_get(
                port,
                b"/accounts/42",
                &[(CASE, "raw-plain"), ("authorization", &token)],
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, "200");
    assert_eq!(upstream.served("raw-plain").len(), 1);
}
