//! Certificate-bound access tokens (RFC 8705) through the real Envoy 1.40: clients speak mutual
//! TLS to Envoy running `examples/envoy/envoy-client-certificates.yaml`, Envoy passes each
//! request's client certificate to the real `stepgate` binary in `attributes.source.certificate`,
//! and stepgate holds a token whose `cnf.x5t#S256` names a certificate to the certificate the
//! request was made with. What the upstream received says whether a request got through.
//!
//! Every test starts its own stepgate, echo upstream and Envoy, and makes its own CA and
//! certificates with rcgen: nothing is committed, nothing expires, tests share nothing. The
//! thumbprints in the tokens are computed here from the certificates' DER, apart from stepgate's
//! code, so that a wrong reading of RFC 8705 §3.1 on either side shows.
//!
//! Envoy: `$STEPGATE_ENVOY`, else `.venv/bin/envoy` (`./scripts/setup-peers` installs it).

mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/pki.rs"]
mod pki;

use std::time::{Duration, Instant};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use common::{Server, TempPolicy, demo_policy_text, edit, mint, run_bin};
use envoy::{Echo, Envoy};
use pki::{Ca, Leaf, Scratch};
use reqwest::header::HeaderMap;
use sha2::{Digest as _, Sha256};
use stepgate::demo::TokenSpec;

/// The example Envoy configuration these tests run.
const EXAMPLE: &str = "envoy-client-certificates.yaml";
/// The example's file paths, which the tests point at generated files.
const SERVER_CERT_PATH: &str = "/etc/envoy/tls/tls.crt";
const SERVER_KEY_PATH: &str = "/etc/envoy/tls/tls.key";
const CLIENT_CA_PATH: &str = "/etc/envoy/client-ca/ca.crt";
/// The example's listener refusing clients without a certificate, and the same listener asking
/// for one without requiring it.
const REQUIRED: &str = "require_client_certificate: true";
const ASKED: &str = "require_client_certificate: false";
/// The example's ext_authz setting that passes the certificate on, and the same filter without it.
const PASSED_ON: &str = "include_peer_certificate: true";
const NOT_PASSED_ON: &str = "include_peer_certificate: false";

/// The rule these tests add to the demo policy: its routes take only certificate-bound tokens.
const BOUND_RULE: &str = "  - id: certificate-bound
    description: Payment initiation takes only tokens bound to the client's certificate (FAPI 2.0).
    match: { path: \"/open-banking/**\" }
    require: { certificate_bound: true }

";
/// The demo policy's catch-all rule, before which [`BOUND_RULE`] goes.
const CATCH_ALL: &str = "  - id: everything-else\n";

/// The header that names a request's scenario in the echo upstream's record.
const CASE: &str = "x-e2e-case";
/// The demo policy's realm, as every challenge names it.
const REALM: &str = "stepgate-demo";

/// How long Envoy may take to relay stepgate's first answer, and to write an access log line
/// (both well under a second; the margin is for a loaded machine).
const EVENT_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Certificates and tokens
// ---------------------------------------------------------------------------------------------

/// The certificate's `x5t#S256` as RFC 8705 §3.1 spells it: unpadded base64url of the SHA-256 of
/// its DER.
fn x5t_s256(leaf: &Leaf) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(leaf.der.as_ref()))
}

/// A demo token (alice, demo-entra) bound to `leaf`.
fn bound_to(leaf: &Leaf) -> String {
    let mut spec = TokenSpec::default();
    spec.extra.insert(
        "cnf".to_owned(),
        serde_json::json!({ "x5t#S256": x5t_s256(leaf) }),
    );
    mint(&spec)
}

/// A demo token (alice, demo-entra) bound to nothing.
fn bearer() -> String {
    mint(&TokenSpec::default())
}

// ---------------------------------------------------------------------------------------------
// The stack: stepgate + echo upstream + Envoy terminating mutual TLS
// ---------------------------------------------------------------------------------------------

/// One test's stepgate, echo upstream and Envoy, with the CA and client certificates its clients
/// present.
struct Stack {
    envoy: Envoy,
    echo: Echo,
    server: Server,
    ca: Ca,
    /// Two clients of the same CA: both pass Envoy's handshake, only one is a token's.
    a: Leaf,
    b: Leaf,
    files: Scratch,
    _policy: TempPolicy,
}

/// One answer Envoy gave the client.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn www_authenticate(&self) -> Option<String> {
        let mut values = self.headers.get_all("www-authenticate").iter();
        let first = values.next()?;
        assert!(
            values.next().is_none(),
            "more than one WWW-Authenticate: {self:?}"
        );
        Some(String::from_utf8_lossy(first.as_bytes()).into_owned())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the reply body is not JSON ({e}): {self:?}"))
    }
}

/// The demo policy with [`BOUND_RULE`] before its catch-all.
fn policy() -> TempPolicy {
    let text = edit(
        &demo_policy_text(),
        CATCH_ALL,
        &format!("{BOUND_RULE}{CATCH_ALL}"),
    );
    TempPolicy::new("bound-tokens", &text)
}

impl Stack {
    /// stepgate on the demo policy plus [`BOUND_RULE`], behind the example with `edits` made to
    /// it; returns once Envoy relays stepgate's answer to a client with certificate A.
    async fn start(edits: &[(&str, &str)]) -> Self {
        let ca = Ca::new("stepgate bound-token test CA");
        let files = Scratch::new("bound-tokens");
        let (cert, key) = files.leaf("envoy", &ca.server(&["localhost", "127.0.0.1"], 2040));
        let client_ca = files.write("client-ca.crt", &ca.pem());
        let [cert, key, client_ca] = [cert, key, client_ca]
            .map(|path| path.to_str().expect("a UTF-8 temporary path").to_owned());
        let policy = policy();
        let server = Server::start(&policy.path).await;
        let echo = Echo::start().await;
        let mut all = vec![
            (SERVER_CERT_PATH, cert.as_str()),
            (SERVER_KEY_PATH, key.as_str()),
            (CLIENT_CA_PATH, client_ca.as_str()),
        ];
        all.extend_from_slice(edits);
        let envoy = Envoy::start_edited(EXAMPLE, server.port, echo.port, &all).await;
        let stack = Self {
            envoy,
            echo,
            server,
            a: ca.client_named("client A", &[]),
            b: ca.client_named("client B", &[]),
            ca,
            files,
            _policy: policy,
        };
        stack.warm_up().await;
        stack
    }

    /// An HTTPS client that trusts the test CA alone and presents `certificate`, if any. One per
    /// certificate: a pooled connection keeps the certificate it was opened with.
    fn client(&self, certificate: Option<&Leaf>) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.ca.pem().as_bytes()).expect("the CA's PEM");
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca);
        if let Some(leaf) = certificate {
            let pem = format!("{}{}", leaf.cert, leaf.key);
            builder = builder
                .identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("a client identity"));
        }
        builder.build().expect("an HTTPS client")
    }

    /// Retries an anonymous request with certificate A until Envoy relays stepgate's 401 (the
    /// first `Check` opens Envoy's HTTP/2 connection to stepgate).
    async fn warm_up(&self) {
        let client = self.client(Some(&self.a));
        let deadline = Instant::now() + EVENT_DEADLINE;
        let mut last;
        loop {
            match client
                .get(self.url("/__warm-up"))
                .header(CASE, "warm-up")
                .send()
                .await
            {
                Ok(r) if r.status() == 401 => return,
                Ok(r) => last = format!("status {}", r.status()),
                Err(e) => last = format!("{e:?}"),
            }
            assert!(
                Instant::now() < deadline,
                "Envoy did not relay stepgate's 401 within {EVENT_DEADLINE:?} (last: {last}).\n{}",
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.envoy.ports.listener)
    }

    /// `GET path` with `x-e2e-case: case` and the token, if any; `Err` when no HTTP answer came.
    async fn try_get(
        &self,
        client: &reqwest::Client,
        case: &str,
        path: &str,
        token: Option<&str>,
    ) -> Result<Reply, reqwest::Error> {
        let mut request = client.get(self.url(path)).header(CASE, case);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.text().await.unwrap_or_default();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    async fn get(
        &self,
        client: &reqwest::Client,
        case: &str,
        path: &str,
        token: Option<&str>,
    ) -> Reply {
        self.try_get(client, case, path, token)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "[{case}] GET {path} through Envoy: {e:?}\n{}",
                    self.diagnostics()
                )
            })
    }

    /// The reply is the upstream's 200, and the upstream got the request once, allowed by `rule`
    /// for alice.
    fn assert_allowed(&self, case: &str, reply: &Reply, rule: &str) {
        let context = || format!("[{case}] reply {reply:?}\n{}", self.diagnostics());
        assert_eq!(reply.status, 200, "{}", context());
        let upstream = self.echo.requests_with(CASE, case);
        assert_eq!(upstream.len(), 1, "upstream calls; {}", context());
        assert_eq!(
            upstream[0].header_all("x-stepgate-rule"),
            [rule],
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

    /// The reply is stepgate's 401 for `reason` with RFC 6750's `invalid_token` challenge (the
    /// client needs another token, not another sign-in), and the upstream never got the request.
    fn assert_refused(&self, case: &str, reply: &Reply, reason: &str) {
        let context = || format!("[{case}] reply {reply:?}\n{}", self.diagnostics());
        assert_eq!(reply.status, 401, "{}", context());
        assert_eq!(reply.json()["reason"], reason, "{}", context());
        assert_eq!(reply.json()["error"], "invalid_token", "{}", context());
        let www = reply
            .www_authenticate()
            .unwrap_or_else(|| panic!("no challenge; {}", context()));
        assert!(
            www.starts_with(&format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\""
            )),
            "{www}; {}",
            context()
        );
        let upstream = self.echo.requests_with(CASE, case);
        assert!(
            upstream.is_empty(),
            "a refused request reached the upstream: {upstream:?}; {}",
            context()
        );
    }

    /// Envoy's access log line for `GET path` (the operator's view of the decision).
    async fn access_log_line(&self, path: &str) -> String {
        let prefix = format!("GET {path} ");
        self.envoy
            .wait_for_access_log(EVENT_DEADLINE, |l| l.starts_with(&prefix))
            .await
            .unwrap_or_else(|| panic!("no access log line for {path}\n{}", self.diagnostics()))
    }

    /// Envoy's stderr and access log and stepgate's log, for failure messages.
    fn diagnostics(&self) -> String {
        format!(
            "--- Envoy stderr ---\n{}\n--- Envoy access log ---\n{}\n--- stepgate log (last 20 \
             lines) ---\n{}",
            tail(&self.envoy.stderr(), 40),
            tail(&self.envoy.access_log(), 40),
            tail(&self.server.logs_text(), 20)
        )
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_token_bound_to_the_client_certificate_reaches_the_upstream_over_that_certificate() {
    let stack = Stack::start(&[]).await;
    let with_a = stack.client(Some(&stack.a));

    let reply = stack
        .get(&with_a, "bound-a", "/accounts", Some(&bound_to(&stack.a)))
        .await;
    stack.assert_allowed("bound-a", &reply, "everything-else");

    // The token an operator mints to try the example (`stepgate token --bound-to client.pem`).
    let pem = stack.files.write("client-a.pem", &stack.a.cert);
    let pem = pem.to_str().expect("a UTF-8 temporary path");
    let (code, stdout, stderr) = run_bin(["token", "--bound-to", pem]);
    assert_eq!(code, Some(0), "stepgate token --bound-to: {stderr}");
    let reply = stack
        .get(&with_a, "bound-a-cli", "/accounts", Some(stdout.trim()))
        .await;
    stack.assert_allowed("bound-a-cli", &reply, "everything-else");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_bound_to_one_client_certificate_is_refused_over_another_of_the_same_ca() {
    let stack = Stack::start(&[]).await;
    let with_b = stack.client(Some(&stack.b));

    let reply = stack
        .get(
            &with_b,
            "bound-a-over-b",
            "/accounts/b",
            Some(&bound_to(&stack.a)),
        )
        .await;
    stack.assert_refused("bound-a-over-b", &reply, "client_certificate_mismatch");
    let line = stack.access_log_line("/accounts/b").await;
    assert!(
        line.starts_with("GET /accounts/b 401 outcome=DENY reason=client_certificate_mismatch "),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_bound_to_a_client_certificate_is_refused_over_a_connection_without_one() {
    // As the example is, a client without a certificate gets no HTTP answer at all: Envoy
    // refuses it at the handshake.
    let strict = Stack::start(&[]).await;
    let anonymous = strict.client(None);
    let token = bound_to(&strict.a);
    let refused = strict
        .try_get(
            &anonymous,
            "no-certificate-strict",
            "/accounts",
            Some(&token),
        )
        .await;
    // Refused, not timed out: the handshake's alert ends the connection at once.
    assert!(
        refused.as_ref().is_err_and(|e| !e.is_timeout()),
        "a client without a certificate got an answer: {refused:?}\n{}",
        strict.diagnostics()
    );
    assert!(
        strict
            .echo
            .requests_with(CASE, "no-certificate-strict")
            .is_empty(),
        "a client without a certificate reached the upstream"
    );
    drop(strict);

    // A listener that asks for a certificate without requiring one lets the client in, and
    // stepgate refuses the bound token.
    let lenient = Stack::start(&[(REQUIRED, ASKED)]).await;
    let anonymous = lenient.client(None);
    let reply = lenient
        .get(
            &anonymous,
            "no-certificate",
            "/accounts/none",
            Some(&bound_to(&lenient.a)),
        )
        .await;
    lenient.assert_refused("no-certificate", &reply, "client_certificate_missing");
    // The same listener still hands a client's certificate on when there is one.
    let with_a = lenient.client(Some(&lenient.a));
    let reply = lenient
        .get(
            &with_a,
            "lenient-bound-a",
            "/accounts",
            Some(&bound_to(&lenient.a)),
        )
        .await;
    lenient.assert_allowed("lenient-bound-a", &reply, "everything-else");
}

/// The misconfiguration operators hit: TLS and client certificates set up on the listener, the
/// ext_authz filter not told to pass the certificate on. Envoy then sends none, and every bound
/// token is refused as if the client had presented no certificate.
#[tokio::test(flavor = "multi_thread")]
async fn without_include_peer_certificate_a_bound_token_is_refused_even_over_its_certificate() {
    let stack = Stack::start(&[(PASSED_ON, NOT_PASSED_ON)]).await;
    let with_a = stack.client(Some(&stack.a));

    let reply = stack
        .get(
            &with_a,
            "not-passed-on",
            "/accounts/a",
            Some(&bound_to(&stack.a)),
        )
        .await;
    stack.assert_refused("not-passed-on", &reply, "client_certificate_missing");
    let line = stack.access_log_line("/accounts/a").await;
    assert!(
        line.starts_with("GET /accounts/a 401 outcome=DENY reason=client_certificate_missing "),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_bound_rule_refuses_a_bearer_token_that_another_rule_accepts() {
    let stack = Stack::start(&[]).await;
    // A bearer token over mutual TLS is still a bearer token: the connection's certificate binds
    // nothing the token does not name.
    let with_a = stack.client(Some(&stack.a));
    let token = bearer();

    let reply = stack
        .get(
            &with_a,
            "bearer-bound-rule",
            "/open-banking/payments",
            Some(&token),
        )
        .await;
    stack.assert_refused("bearer-bound-rule", &reply, "token_not_bound");
    assert_eq!(reply.json()["rule"], "certificate-bound", "{reply:?}");

    let reply = stack
        .get(&with_a, "bearer-other-rule", "/accounts", Some(&token))
        .await;
    stack.assert_allowed("bearer-other-rule", &reply, "everything-else");

    let reply = stack
        .get(
            &with_a,
            "bound-bound-rule",
            "/open-banking/payments",
            Some(&bound_to(&stack.a)),
        )
        .await;
    stack.assert_allowed("bound-bound-rule", &reply, "certificate-bound");
}
