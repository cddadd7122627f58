//! An identity provider behind a private CA: the real `stepgate` binary fetches discovery and keys
//! over https from the test provider (`tests/common/idp.rs`), whose certificate a throwaway CA made
//! here signs. It trusts that CA through the issuer's `ca_file` (which replaces the bundled web
//! roots for that issuer) or through `--idp-ca` (added to them for every issuer), and nothing else:
//! without either, or with another CA, the keys never load and tokens are refused.

mod common;
#[path = "common/idp.rs"]
mod idp;

use std::{sync::Arc, time::Duration};

use common::{Server, Spawn, TempPolicy, mint_with};
use idp::{DISCOVERY_PATH, Idp};
use jsonwebtoken::Algorithm;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use stepgate::{
    api::v1::{
        DecideRequest, DecideResponse, Outcome, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    demo::{self, TokenSpec},
};

/// A CA of the test's own: its certificate (PEM) and what it signs with.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("a self-signed CA"),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1, and an acceptor serving it (HTTP/1.1).
    fn serve_loopback(&self) -> tokio_rustls::TlsAcceptor {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("parameters");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("an IP")));
        let key = KeyPair::generate().expect("a server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("a server certificate");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("a server configuration");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// A policy with one issuer: the provider's discovery document, `ca_line` (YAML, or empty), and
/// one rule allowing any valid token. The CA file `ca.pem` sits next to the policy.
fn policy(name: &str, idp: &Idp, ca_line: &str, ca_pem: &str) -> TempPolicy {
    let text = format!(
        "issuers:\n  \
           - id: private\n    \
             discovery_url: {}\n    \
             audiences: [{}]\n    \
             {ca_line}\n\
         rules:\n  \
           - id: any-valid-token\n    \
             match: {{ operation: \"*\" }}\n    \
             require: {{ authenticated: true }}\n",
        idp.discovery_url(),
        demo::DEMO_AUDIENCE,
    );
    let policy = TempPolicy::new(name, &text);
    std::fs::write(policy.path.with_file_name("ca.pem"), ca_pem).expect("writing ca.pem");
    policy
}

async fn decide(server: &Server, issuer: &str) -> DecideResponse {
    let token = mint_with(
        &TokenSpec {
            issuer: issuer.to_owned(),
            ..TokenSpec::default()
        },
        Algorithm::RS256,
    );
    let mut client = DecisionServiceClient::new(server.channel().await);
    client
        .decide(DecideRequest {
            credential: Some(Credential::Token(token)),
            operation: "reports.read".into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuers_ca_file_trusts_its_private_ca() {
    let ca = Ca::new("stepgate test IdP CA");
    let idp = Idp::start_tls(ca.serve_loopback()).await;
    assert!(idp.discovery_url().starts_with("https://"));
    let policy = policy("idp-ca-file", &idp, "ca_file: ca.pem", &ca.pem());
    // Ready only once the issuer has keys: fetched over https, trusting ca.pem.
    let server = Server::start(&policy.path).await;
    let answer = decide(&server, &idp.issuer()).await;
    assert_eq!(answer.outcome(), Outcome::Allow, "{answer:?}");
    assert!(idp.requests(DISCOVERY_PATH) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idp_ca_flag_trusts_a_private_ca_for_every_issuer() {
    let ca = Ca::new("stepgate test corporate CA");
    let idp = Idp::start_tls(ca.serve_loopback()).await;
    let policy = policy("idp-ca-flag", &idp, "", &ca.pem());
    let ca_path = policy.path.with_file_name("ca.pem");
    let server = Server::spawn_with(
        &policy.path,
        Spawn {
            args: vec!["--idp-ca".into(), ca_path.display().to_string()],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let answer = decide(&server, &idp.issuer()).await;
    assert_eq!(answer.outcome(), Outcome::Allow, "{answer:?}");
}

/// Without the CA, or with another CA as the issuer's `ca_file`, the certificate is refused: the
/// keys never load, the logs say why, and a token of that issuer is denied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_certificate_from_an_untrusted_ca_is_refused() {
    let ca = Ca::new("stepgate test IdP CA");
    let other = Ca::new("another CA");
    let idp = Idp::start_tls(ca.serve_loopback()).await;
    for (name, ca_line) in [("no-ca", ""), ("other-ca", "ca_file: ca.pem")] {
        let policy = policy(name, &idp, ca_line, &other.pem());
        let server = Server::spawn_with(
            &policy.path,
            Spawn {
                args: vec!["--ready-when".into(), "always".into()],
                ..Spawn::default()
            },
        );
        server.wait_ready().await;
        assert!(
            server
                .wait_for_text(Duration::from_secs(20), &["certificate"])
                .await,
            "{name}: a key load failing on the certificate is logged:\n{}",
            server.logs_text()
        );
        let answer = decide(&server, &idp.issuer()).await;
        assert_eq!(answer.outcome(), Outcome::Deny, "{name}: {answer:?}");
    }
}

#[test]
fn a_ca_file_that_is_no_certificate_is_refused_with_its_field() {
    let idp_url = "https://idp.example/.well-known/openid-configuration";
    let text = format!(
        "issuers:\n  - id: private\n    discovery_url: {idp_url}\n    audiences: [api]\n    \
         ca_file: ca.pem\nrules:\n  - id: r\n    match: {{ operation: \"*\" }}\n    \
         require: {{ authenticated: true }}\n"
    );
    let policy = TempPolicy::new("bad-ca", &text);
    for content in ["", "not a certificate\n"] {
        std::fs::write(policy.path.with_file_name("ca.pem"), content).unwrap();
        let (code, _, stderr) = common::check_policy(&policy.path);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains("issuers[0].ca_file"), "{stderr}");
    }
}

/// A reload that replaces an issuer's CA bundle (a compromised CA withdrawn) does not keep the
/// keys fetched under the old trust: they are fetched again through the new CAs. Here the
/// provider's certificate is not from the new CA, so no key loads and the reload is refused,
/// naming the issuer, rather than the old keys served under a trust the operator withdrew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_replacing_the_ca_file_fetches_the_keys_again() {
    let ca = Ca::new("stepgate test IdP CA");
    let idp = Idp::start_tls(ca.serve_loopback()).await;
    let policy = policy("idp-ca-replaced", &idp, "ca_file: ca.pem", &ca.pem());
    let server = Server::start(&policy.path).await;
    assert_eq!(
        decide(&server, &idp.issuer()).await.outcome(),
        Outcome::Allow
    );

    let other = Ca::new("another CA");
    std::fs::write(policy.path.with_file_name("ca.pem"), other.pem()).expect("writing ca.pem");
    let seen = server.json_logs().len();
    server.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let line = loop {
        let lines = server.json_logs();
        if let Some(line) = lines.iter().skip(seen).find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("policy reload"))
        }) {
            break line.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reload line:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let text = line.to_string();
    assert!(
        text.contains("refused") && text.contains("issuers[0]"),
        "the reload kept the keys fetched under the old CA: {line}"
    );
}
