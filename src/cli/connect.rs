//! The gRPC channel of the client commands (`decide --server`, `health`): plaintext for
//! `http://`, TLS for `https://` trusting only the CA bundle given (`--ca`), with an optional
//! client certificate for a server that requires mutual TLS.

use std::{path::PathBuf, time::Duration};

use stepgate::telemetry::with_causes;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How to reach a server over TLS.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientTlsArgs {
    /// With an https:// server: the CA bundle (PEM) its certificate must chain to.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM) for a server that requires mutual TLS (with --key).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the server certificate must carry, when it differs from the URL's host (e.g.
    /// the Service name while connecting to 127.0.0.1 inside the pod).
    #[arg(long)]
    pub tls_server_name: Option<String>,
}

/// Connects to `server` (`http://host:port` or `https://host:port`) within `timeout`.
pub async fn channel(
    server: &str,
    tls: &ClientTlsArgs,
    timeout: Duration,
) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(server.to_owned())
        .map_err(|e| format!("{server:?} is not a URL: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let https = server.starts_with("https://");
    if https {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let ca = tls.ca.as_ref().ok_or_else(|| {
            format!("{server} is https: give the CA bundle its certificate chains to (--ca)")
        })?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(name) = &tls.tls_server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS settings: {e}"))?;
    } else if tls.ca.is_some() || tls.cert.is_some() {
        return Err(format!(
            "--ca and --cert are for an https:// server, not {server}"
        ));
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {}", with_causes(&e)))
}

/// Whether what is sent to `server` stays between the two ends: over TLS (`https://`), or over
/// plaintext to a loopback address (`localhost`, `127.0.0.0/8`, `[::1]`).
pub fn private_transport(server: &str) -> bool {
    if server.starts_with("https://") {
        return true;
    }
    let Ok(uri) = server.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    match uri.host() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback()),
        None => false,
    }
}

/// A call's failure with its causes (a refused client certificate is only "transport error"
/// in the status's own message).
pub fn status_text(status: &tonic::Status) -> String {
    let text = format!("{:?}: {}", status.code(), status.message());
    match std::error::Error::source(status) {
        Some(cause) if !text.contains(&cause.to_string()) => {
            format!("{text}: {}", with_causes(cause))
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::private_transport;

    #[test]
    fn a_token_goes_in_the_clear_only_to_loopback() {
        for private in [
            "https://stepgate.example:8443",
            "http://127.0.0.1:9001",
            "http://127.8.0.1:9001",
            "http://localhost:9001",
            "http://[::1]:9001",
            "http://[::ffff:127.0.0.1]:9001",
        ] {
            assert!(private_transport(private), "{private}");
        }
        for public in [
            "http://10.0.0.7:9001",
            "http://stepgate.security:9001",
            "http://localhost.example:9001",
            "http://[2001:db8::1]:9001",
            "not a url",
        ] {
            assert!(!private_transport(public), "{public}");
        }
    }
}
