//! Certificate-bound access tokens (RFC 8705 §3): a token whose `cnf` holds `x5t#S256`, the
//! SHA-256 of a client certificate's DER, is good only over a TLS connection the client
//! authenticated with that certificate. The proxy that terminated the connection says which
//! certificate it was: Envoy in `attributes.source.certificate` (URL-encoded PEM, with
//! `include_peer_certificate: true`), a `Decide` caller in `client_certificate` (DER).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::pem::{PemObject, SectionKind};
use sha2::{Digest, Sha256};

/// A thumbprint: the SHA-256 of a certificate's DER.
pub type Thumbprint = [u8; 32];

/// The longest certificate read (DER, or Envoy's URL-encoded PEM of it). A client certificate is
/// 1–2 KiB; one with many names, 4–8 KiB.
pub const MAX_CERTIFICATE_BYTES: usize = 32 * 1024;

/// `x5t#S256` as RFC 8705 §3.1 writes it: base64url without padding, of exactly 32 bytes (43
/// characters whose last carries no stray bits). Any other spelling is `None`.
pub fn decode(x5t_s256: &str) -> Option<Thumbprint> {
    if x5t_s256.len() != 43 {
        return None;
    }
    URL_SAFE_NO_PAD.decode(x5t_s256).ok()?.try_into().ok()
}

/// The `x5t#S256` spelling of a thumbprint.
pub fn encode(thumbprint: &Thumbprint) -> String {
    URL_SAFE_NO_PAD.encode(thumbprint)
}

/// The client certificate a request came with, as its proxy or caller gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCertificate {
    /// Envoy's `attributes.source.certificate`: the leaf certificate in PEM, URL-encoded.
    UrlEncodedPem(String),
    /// The leaf certificate's DER, as TLS stacks give it (`Decide`).
    Der(Vec<u8>),
    /// Only its thumbprint (a replayed record keeps no more).
    Thumbprint(Thumbprint),
}

/// Why a request's certificate cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CertificateProblem {
    #[error("the client certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")]
    TooLarge,
    #[error("the client certificate is not one PEM certificate")]
    NotOnePem,
}

impl ClientCertificate {
    /// The certificate's thumbprint (SHA-256 of its DER).
    pub fn thumbprint(&self) -> Result<Thumbprint, CertificateProblem> {
        match self {
            ClientCertificate::Thumbprint(t) => Ok(*t),
            ClientCertificate::Der(der) if der.len() > MAX_CERTIFICATE_BYTES => {
                Err(CertificateProblem::TooLarge)
            }
            ClientCertificate::Der(der) => Ok(Sha256::digest(der).into()),
            ClientCertificate::UrlEncodedPem(pem) if pem.len() > MAX_CERTIFICATE_BYTES * 3 => {
                Err(CertificateProblem::TooLarge)
            }
            ClientCertificate::UrlEncodedPem(pem) => {
                let pem: Vec<u8> = percent_encoding::percent_decode_str(pem).collect();
                let der = one_certificate(&pem).ok_or(CertificateProblem::NotOnePem)?;
                Ok(Sha256::digest(der).into())
            }
        }
    }
}

/// The DER of the one `CERTIFICATE` section of `pem`; `None` when it holds any other section,
/// more than one, none, or a malformed one. The leaf alone is what Envoy sends: a chain would
/// leave open which certificate the binding is to.
fn one_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    let mut sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem);
    let (kind, der) = sections.next()?.ok()?;
    (kind == SectionKind::Certificate && sections.next().is_none()).then_some(der)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";

    fn url_encoded(pem: &str) -> String {
        percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    #[test]
    fn a_thumbprint_reads_only_in_its_one_spelling() {
        let t: Thumbprint = Sha256::digest(b"certificate").into();
        let spelled = encode(&t);
        assert_eq!(spelled.len(), 43);
        assert_eq!(decode(&spelled), Some(t));
        // Padding, the standard alphabet, stray bits in the last character, other lengths.
        assert_eq!(decode(&format!("{spelled}=")), None);
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode(t);
        if standard != spelled {
            assert_eq!(decode(&standard), None);
        }
        let last = spelled.as_bytes()[42];
        let stray = match last {
            b'A' => 'B',
            _ => 'A',
        };
        let mut bits = spelled[..42].to_owned();
        bits.push(stray);
        // The 43rd character carries 2 data bits and 4 zero bits: only 4 of 64 letters are
        // canonical, and changing a canonical one to another letter either changes the data or
        // sets a stray bit.
        assert_ne!(decode(&bits), Some(t));
        assert_eq!(decode(&spelled[..42]), None);
        assert_eq!(decode(&encode(&[0; 32])[..]), Some([0; 32]));
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode([0u8; 31])), None);
    }

    #[test]
    fn envoys_pem_and_the_der_give_one_thumbprint() {
        let der = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let want: Thumbprint = Sha256::digest(der).into();
        assert_eq!(ClientCertificate::Der(der.to_vec()).thumbprint(), Ok(want));
        assert_eq!(
            ClientCertificate::UrlEncodedPem(url_encoded(PEM)).thumbprint(),
            Ok(want)
        );
        // Envoy leaves the base64 alphabet's letters and digits as they are.
        assert_eq!(
            ClientCertificate::UrlEncodedPem(PEM.replace('\n', "%0A").replace(' ', "%20"))
                .thumbprint(),
            Ok(want)
        );
        assert_eq!(ClientCertificate::Thumbprint(want).thumbprint(), Ok(want));
    }

    #[test]
    fn anything_but_one_pem_certificate_is_refused() {
        let key = "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n";
        for pem in [
            String::new(),
            "not pem".to_owned(),
            format!("{PEM}{PEM}"),
            key.to_owned(),
            format!("{key}{PEM}"),
            format!("{PEM}{key}"),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_owned(),
            "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n".to_owned(),
        ] {
            assert_eq!(
                ClientCertificate::UrlEncodedPem(url_encoded(&pem)).thumbprint(),
                Err(CertificateProblem::NotOnePem),
                "{pem:?}"
            );
        }
        let huge = vec![0u8; MAX_CERTIFICATE_BYTES + 1];
        assert_eq!(
            ClientCertificate::Der(huge).thumbprint(),
            Err(CertificateProblem::TooLarge)
        );
        assert_eq!(
            ClientCertificate::UrlEncodedPem("%41".repeat(MAX_CERTIFICATE_BYTES + 1)).thumbprint(),
            Err(CertificateProblem::TooLarge)
        );
    }
}
