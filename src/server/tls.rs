//! TLS and mutual TLS on the gRPC listener (rustls, with aws-lc).
//!
//! `--tls-cert`/`--tls-key` turn TLS on; `--client-ca` also requires every client to present a
//! certificate that chains to one of its CAs, and `--client-san` narrows that to certificates
//! naming one of the listed subject alternative names (a DNS name, a URI such as an Istio or
//! SPIFFE identity `spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account`,
//! or an IP address), compared exactly. A client refused there fails the handshake with a TLS
//! alert and never reaches a gRPC service.
//!
//! The acceptor is ours (tokio-rustls, the rustls tonic's own TLS support wraps) rather than
//! tonic's `ServerTlsConfig`, which takes its certificate once at start and handshakes inside its
//! accept loop: a rotated certificate must reach new connections without a restart, and a slow
//! handshake must hold only its own connection slot, under `--handshake-timeout`.
//!
//! The three files are watched ([`super::files`]) and the server configuration is rebuilt when
//! their content changes (cert-manager and Kubernetes rotate a Secret in place): each new
//! connection takes the configuration current when it arrives, connections already open keep
//! theirs, so no call fails. A set of files that does not build (a key that does not match its
//! certificate, half-written files) is refused with a log line and a metric, and the previous
//! configuration keeps serving.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::files::FileWatch;
use crate::identity::san::{self, SanName};
use crate::telemetry::{
    metrics,
    throttle::{Throttle, WARNING_PERIOD},
};

/// The listener's TLS settings, from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM: the server certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CAs a client certificate must chain to; `None`: no client certificate asked for.
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: the subject alternative names a client certificate must include one of
    /// (empty: any certificate of those CAs).
    pub client_sans: Vec<SanName>,
}

impl TlsSettings {
    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.cert.clone(), self.key.clone()];
        files.extend(self.client_ca.clone());
        files
    }
}

/// The server configuration new connections take, rebuilt when its files change.
pub struct Tls {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What the handshake established about the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject alternative names of the verified client certificate (empty without mTLS).
    pub sans: Vec<SanName>,
    /// The SHA-256 of the client certificate's DER: an admin token bound to it (RFC 8705) is
    /// good on this connection.
    pub thumbprint: Option<crate::identity::Thumbprint>,
}

impl Tls {
    /// Builds the configuration from the files; an error names the file and what is wrong with it.
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, String> {
        let (config, not_after) = build(&settings)?;
        metrics::global().set_tls_certificate_expiry(not_after);
        Ok(Arc::new(Self {
            settings,
            current: ArcSwap::from_pointee(config),
        }))
    }

    /// An acceptor with the configuration as it is now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.settings.client_ca.is_some()
    }

    /// The client SANs admitted, for the log: comma-separated, `any` when every certificate of
    /// the client CAs is.
    pub fn client_sans_text(&self) -> String {
        super::check_callers::list_text(self.settings.client_sans.iter().map(ToString::to_string))
    }

    /// Rebuilds the configuration whenever the files' content changes, until `stop`.
    pub fn spawn_reload(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        /// How long after a refused reload the files are read again (or at once when they change).
        const RELOAD_RETRY: std::time::Duration = std::time::Duration::from_secs(30);
        let tls = Arc::clone(self);
        let mut files = FileWatch::new(tls.settings.files(), "TLS certificate");
        tokio::spawn(async move {
            // After a refused reload: when to read the same files again (a read that failed for
            // a passing reason — a timeout, a key and certificate caught between two updates —
            // is not left until the files change again or the certificate expires).
            let mut retry: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
            loop {
                tokio::select! {
                    () = files.changed() => {}
                    () = async { retry.as_mut().expect("guarded").await }, if retry.is_some() => {}
                    _ = stop.changed() => return,
                }
                retry = None;
                // Off the serving threads, like the watch's own reads: the files are read again.
                let settings = tls.settings.clone();
                let building = tokio::task::spawn_blocking(move || build(&settings));
                let built = match tokio::time::timeout(super::files::READ_TIMEOUT, building).await {
                    Ok(Ok(built)) => built,
                    Ok(Err(panicked)) => {
                        Err(format!("building the configuration failed: {panicked}"))
                    }
                    Err(_) => Err(format!(
                        "reading the TLS files took more than {:?}",
                        super::files::READ_TIMEOUT
                    )),
                };
                match built {
                    Ok((config, not_after)) => {
                        tls.current.store(Arc::new(config));
                        metrics::global().record_tls_reload(true);
                        metrics::global().set_tls_certificate_expiry(not_after);
                        tracing::info!(
                            cert = %tls.settings.cert.display(),
                            not_after,
                            "TLS certificate reloaded; new connections use it"
                        );
                    }
                    Err(error) => {
                        metrics::global().record_tls_reload(false);
                        tracing::error!(
                            %error,
                            retry_in = ?RELOAD_RETRY,
                            "TLS reload refused; the previous certificate keeps serving"
                        );
                        retry = Some(Box::pin(tokio::time::sleep(RELOAD_RETRY)));
                    }
                }
            }
        });
    }
}

/// The client identity of an established TLS connection.
pub fn client_identity(connection: &rustls::ServerConnection) -> ClientIdentity {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first());
    let sans = leaf
        .and_then(|cert| subject_alt_names(cert).ok())
        .unwrap_or_default();
    let thumbprint = leaf.map(|cert| {
        use sha2::Digest as _;
        sha2::Sha256::digest(cert.as_ref()).into()
    });
    ClientIdentity { sans, thumbprint }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server configuration and the certificate's expiry (Unix seconds).
fn build(settings: &TlsSettings) -> Result<(ServerConfig, i64), String> {
    let chain = read_certificates(&settings.cert, "--tls-cert")?;
    let not_after = certificate_expiry(&chain[0])
        .map_err(|e| format!("--tls-cert {}: {e}", settings.cert.display()))?;
    let key = crate::config::read_file(&settings.key)
        .map_err(|e| format!("--tls-key {}: {e}", settings.key.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
        format!(
            "--tls-key {}: no usable PEM private key ({e})",
            settings.key.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol versions: {e}"))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(ca, "--client-ca")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(Arc::new(SanAllowList {
                inner: verifier,
                allowed: settings.client_sans.clone(),
            }))
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "--tls-cert {} with --tls-key {}: {e}",
            settings.cert.display(),
            settings.key.display()
        )
    })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((config, not_after))
}

fn read_certificates(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem =
        crate::config::read_file(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn certificate_expiry(cert: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    Ok(parsed.validity().not_after.timestamp())
}

/// The DNS, URI and IP subject alternative names of a certificate, each of its type. An error
/// (the certificate or the extension does not parse, or the extension appears twice) refuses the
/// certificate.
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Result<Vec<SanName>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let extension = parsed
        .subject_alternative_name()
        .map_err(|e| format!("its subjectAltName does not parse: {e}"))?;
    let mut names = Vec::new();
    for name in extension.iter().flat_map(|e| &e.value.general_names) {
        match name {
            GeneralName::DNSName(dns) => names.push(SanName::dns(dns)),
            GeneralName::URI(uri) => names.push(SanName::Uri((*uri).to_owned())),
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).expect("length checked")),
                    16 => IpAddr::from(<[u8; 16]>::try_from(*bytes).expect("length checked")),
                    _ => continue,
                };
                names.push(SanName::Ip(ip));
            }
            _ => {}
        }
    }
    Ok(names)
}

/// The CA verifier, then the SAN allow-list.
#[derive(Debug)]
struct SanAllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<SanName>,
}

impl ClientCertVerifier for SanAllowList {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() {
            return Ok(verified);
        }
        let names = subject_alt_names(end_entity).map_err(|e| {
            refused(
                &format!("its subject alternative names cannot be read: {e}"),
                &[],
            );
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if san::any_allowed(&names, &self.allowed) {
            Ok(verified)
        } else {
            refused(
                "none of its subject alternative names is in --client-san",
                &names,
            );
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Says, at most every 10 s (like a failed handshake), that a client certificate was refused,
/// and names a few of its SANs: each refusal costs whoever holds a certificate of the CA one
/// handshake, and a certificate may carry hundreds of names.
fn refused(why: &str, names: &[SanName]) {
    /// SANs named, and the characters shown of each.
    const SHOWN: usize = 3;
    const SHOWN_CHARS: usize = 80;
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    let Some(unlogged) = WARNINGS.admit() else {
        return;
    };
    let shown: Vec<String> = names
        .iter()
        .take(SHOWN)
        .map(|name| {
            let name = name.to_string();
            match name.char_indices().nth(SHOWN_CHARS) {
                Some((cut, _)) => format!("{}…", &name[..cut]),
                None => name,
            }
        })
        .collect();
    tracing::warn!(
        sans = ?shown,
        san_count = names.len(),
        unlogged,
        "client certificate refused: {why} (later refusals within 10 s are only counted, as TLS handshake errors)"
    );
}
