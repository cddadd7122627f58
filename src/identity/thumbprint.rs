//! Certificate-bound access tokens (RFC 8705 §3): a token whose `cnf` holds `x5t#S256`, the
//! SHA-256 of a client certificate's DER, is good only over a TLS connection the client
//! authenticated with that certificate. The proxy that terminated the connection says which
//! certificate it was: Envoy in `attributes.source.certificate` (URL-encoded PEM, with
//! `include_peer_certificate: true`), a `Decide` caller in `client_certificate` (DER).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use rustls_pki_types::pem::{PemObject, SectionKind};
use sha2::{Digest, Sha256};

/// A thumbprint: the SHA-256 of a certificate's DER.
pub type Thumbprint = [u8; 32];

/// What a request's certificate was read as: its thumbprint, or why it could not be read.
pub type Presented = Result<Thumbprint, CertificateProblem>;

/// How a decision record writes [`Presented`]: the thumbprint as `x5t#S256`, or the problem's
/// word.
pub fn presented_text(presented: &Presented) -> String {
    match presented {
        Ok(thumbprint) => encode(thumbprint),
        Err(problem) => problem.as_str().to_owned(),
    }
}

/// [`presented_text`] read back; `None` for a text it never writes.
pub fn presented_from_text(text: &str) -> Option<ClientCertificate> {
    decode(text)
        .map(ClientCertificate::Thumbprint)
        .or_else(|| CertificateProblem::from_word(text).map(ClientCertificate::Unreadable))
}

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
    /// Envoy's `attributes.source.certificate`: the leaf certificate in PEM, URL-encoded (where
    /// the request's frame holds it: not copied unless a bound token needs it read).
    UrlEncodedPem(Bytes),
    /// The leaf certificate's DER, as TLS stacks give it (`Decide`).
    Der(Vec<u8>),
    /// Only its thumbprint (a replayed record keeps no more).
    Thumbprint(Thumbprint),
    /// One that could not be read (a replayed record's).
    Unreadable(CertificateProblem),
}

/// Why a request's certificate cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CertificateProblem {
    #[error("the client certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")]
    TooLarge,
    #[error("the client certificate is not one PEM certificate")]
    NotOnePem,
}

impl CertificateProblem {
    /// The word a decision record keeps for it.
    pub fn as_str(self) -> &'static str {
        match self {
            CertificateProblem::TooLarge => "too_large",
            CertificateProblem::NotOnePem => "not_one_pem",
        }
    }

    /// [`Self::as_str`] read back.
    pub fn from_word(word: &str) -> Option<Self> {
        [CertificateProblem::TooLarge, CertificateProblem::NotOnePem]
            .into_iter()
            .find(|p| p.as_str() == word)
    }
}

impl ClientCertificate {
    /// The certificate's thumbprint (SHA-256 of its DER).
    pub fn thumbprint(&self) -> Result<Thumbprint, CertificateProblem> {
        match self {
            ClientCertificate::Thumbprint(t) => Ok(*t),
            ClientCertificate::Unreadable(problem) => Err(*problem),
            ClientCertificate::Der(der) if der.len() > MAX_CERTIFICATE_BYTES => {
                Err(CertificateProblem::TooLarge)
            }
            ClientCertificate::Der(der) => Ok(Sha256::digest(der).into()),
            ClientCertificate::UrlEncodedPem(pem) if pem.len() > MAX_CERTIFICATE_BYTES * 3 => {
                Err(CertificateProblem::TooLarge)
            }
            ClientCertificate::UrlEncodedPem(pem) => {
                if let Some(known) = RECENT.with_borrow(|recent| recent.find(pem)) {
                    return Ok(known);
                }
                let thumbprint = read_envoys(pem)?;
                RECENT.with_borrow_mut(|recent| recent.remember(pem, thumbprint));
                Ok(thumbprint)
            }
        }
    }
}

/// The thumbprint of Envoy's URL-encoded PEM, read.
fn read_envoys(pem: &Bytes) -> Result<Thumbprint, CertificateProblem> {
    let pem: Vec<u8> = percent_encoding::percent_decode(pem).collect();
    let der = one_certificate(&pem).ok_or(CertificateProblem::NotOnePem)?;
    if der.len() > MAX_CERTIFICATE_BYTES {
        return Err(CertificateProblem::TooLarge);
    }
    Ok(Sha256::digest(der).into())
}

/// Certificates a thread has read lately, by Envoy's exact text. One client sends the same
/// certificate with every request of its connection, and reading it (decoding the escapes and
/// the base64, encoding it again to compare, hashing) costs several times a cached `Check`:
/// found here, it costs a comparison of its bytes. Only texts read successfully are kept, each
/// with the thumbprint its own bytes gave, so an entry cannot answer for another text.
#[derive(Default)]
struct Recent {
    entries: Vec<(Bytes, Thumbprint)>,
    next: usize,
}

/// How many certificates a thread keeps (a proxy's connections to its clients each carry one).
const RECENT_CERTIFICATES: usize = 16;

thread_local! {
    static RECENT: std::cell::RefCell<Recent> = std::cell::RefCell::default();
}

impl Recent {
    fn find(&self, pem: &Bytes) -> Option<Thumbprint> {
        self.entries
            .iter()
            .find(|(text, _)| text.len() == pem.len() && text[..] == pem[..])
            .map(|(_, thumbprint)| *thumbprint)
    }

    /// Keeps `pem` (its own copy: not the request's frame) in place of the oldest entry.
    fn remember(&mut self, pem: &Bytes, thumbprint: Thumbprint) {
        let entry = (Bytes::copy_from_slice(pem), thumbprint);
        if self.entries.len() < RECENT_CERTIFICATES {
            self.entries.push(entry);
        } else {
            self.entries[self.next] = entry;
            self.next = (self.next + 1) % RECENT_CERTIFICATES;
        }
    }
}

/// The DER of `pem` when `pem` is one certificate exactly as Envoy writes it (OpenSSL's
/// `PEM_write_bio_X509`: the `CERTIFICATE` lines, base64 in lines of 64 characters, each line
/// ended by a line feed, nothing before or after); `None` for anything else. A PEM reader skips
/// text around a section, sections it does not know and stray escapes, and joins what a second
/// `BEGIN` cuts: each a second reading of the same field. The leaf alone is what Envoy sends: a
/// chain would leave open which certificate the binding is to.
fn one_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    let mut sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(pem);
    let (kind, der) = sections.next()?.ok()?;
    let one = kind == SectionKind::Certificate && sections.next().is_none();
    (one && pem == canonical_pem(&der).as_bytes()).then_some(der)
}

/// `der` as OpenSSL writes a certificate in PEM.
fn canonical_pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = String::with_capacity(body.len() + body.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 is ASCII.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n";

    fn url_encoded(pem: &str) -> ClientCertificate {
        let encoded =
            percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC);
        ClientCertificate::UrlEncodedPem(Bytes::from(encoded.to_string()))
    }

    fn as_sent(text: &str) -> ClientCertificate {
        ClientCertificate::UrlEncodedPem(Bytes::from(text.to_owned()))
    }

    #[test]
    fn a_thumbprint_reads_only_in_its_one_spelling() {
        let t: Thumbprint = Sha256::digest(b"certificate").into();
        let spelled = encode(&t);
        assert_eq!(spelled.len(), 43);
        assert_eq!(decode(&spelled), Some(t));
        // Padding, the standard alphabet, other lengths.
        assert_eq!(decode(&format!("{spelled}=")), None);
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode(t);
        if standard != spelled {
            assert_eq!(decode(&standard), None);
        }
        assert_eq!(decode(&spelled[..42]), None);
        assert_eq!(decode(&URL_SAFE_NO_PAD.encode([0u8; 31])), None);
        // The 43rd character carries the last 4 bits of data and 2 zero bits: setting either
        // zero bit spells the same 32 bytes another way, which is refused.
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for t in [t, [0; 32], [0xff; 32]] {
            let spelled = encode(&t);
            let last = alphabet
                .iter()
                .position(|&c| c == spelled.as_bytes()[42])
                .unwrap();
            assert_eq!(last & 0b11, 0, "{spelled}");
            for stray in [1, 2, 3] {
                let mut bits = spelled[..42].to_owned();
                bits.push(alphabet[last | stray] as char);
                assert_eq!(decode(&bits), None, "{bits}");
            }
        }
    }

    #[test]
    fn envoys_pem_and_the_der_give_one_thumbprint() {
        let der = [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let want: Thumbprint = Sha256::digest(der).into();
        assert_eq!(ClientCertificate::Der(der.to_vec()).thumbprint(), Ok(want));
        assert_eq!(url_encoded(PEM).thumbprint(), Ok(want));
        // Envoy leaves the base64 alphabet's letters and digits as they are.
        assert_eq!(
            as_sent(&PEM.replace('\n', "%0A").replace(' ', "%20")).thumbprint(),
            Ok(want)
        );
        assert_eq!(ClientCertificate::Thumbprint(want).thumbprint(), Ok(want));
        // A certificate of several lines, as OpenSSL cuts them.
        let long: Vec<u8> = (0..1000u16).map(|i| (i % 251) as u8).collect();
        let pem = canonical_pem(&long);
        assert_eq!(pem.lines().nth(1).map(str::len), Some(64));
        assert_eq!(
            url_encoded(&pem).thumbprint(),
            Ok(Sha256::digest(&long).into())
        );
    }

    /// Only the one form Envoy writes is read: whatever a PEM reader would skip or join around
    /// it is a second reading of the field, and refused.
    #[test]
    fn anything_but_one_pem_certificate_as_envoy_writes_it_is_refused() {
        let key = "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQ==\n-----END PRIVATE KEY-----\n";
        let unknown = "-----BEGIN X509 CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END X509 \
                       CERTIFICATE-----\n";
        let long: Vec<u8> = (0..100u8).collect();
        let long_pem = canonical_pem(&long);
        for pem in [
            String::new(),
            "not pem".to_owned(),
            format!("{PEM}{PEM}"),
            key.to_owned(),
            format!("{key}{PEM}"),
            format!("{PEM}{key}"),
            format!("{unknown}{PEM}"),
            format!("{PEM}{unknown}"),
            format!("issued to alice\n{PEM}"),
            format!("{PEM}trailing"),
            PEM.trim_end().to_owned(),
            PEM.replace('\n', "\r\n"),
            // A second BEGIN inside the section: a reader joins the base64 of both parts.
            long_pem.replacen("\n", "\n-----BEGIN CERTIFICATE-----\n", 2),
            // Lines of 76 characters, as MIME cuts them.
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                STANDARD
                    .encode(&long)
                    .as_bytes()
                    .chunks(76)
                    .map(|l| std::str::from_utf8(l).unwrap())
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_owned(),
            "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n".to_owned(),
        ] {
            assert_ne!(pem, PEM);
            assert_eq!(
                url_encoded(&pem).thumbprint(),
                Err(CertificateProblem::NotOnePem),
                "{pem:?}"
            );
        }
        // A stray escape, which a decoder leaves as it is.
        assert_eq!(
            as_sent(&format!("%zz{}", url_encoded_text(PEM))).thumbprint(),
            Err(CertificateProblem::NotOnePem)
        );
        let huge = vec![0u8; MAX_CERTIFICATE_BYTES + 1];
        assert_eq!(
            ClientCertificate::Der(huge.clone()).thumbprint(),
            Err(CertificateProblem::TooLarge)
        );
        // The same bound on the certificate Envoy sends, however compactly it is escaped.
        let pem = canonical_pem(&huge);
        assert!(pem.len() < MAX_CERTIFICATE_BYTES * 3);
        assert_eq!(
            as_sent(&pem.replace('\n', "%0A").replace(' ', "%20")).thumbprint(),
            Err(CertificateProblem::TooLarge)
        );
        assert_eq!(
            as_sent(&"%41".repeat(MAX_CERTIFICATE_BYTES + 1)).thumbprint(),
            Err(CertificateProblem::TooLarge)
        );
        // What a thread has read is found again by its exact text only.
        let sent = url_encoded_text(PEM);
        let read = as_sent(&sent).thumbprint().expect("read");
        assert_eq!(as_sent(&sent).thumbprint(), Ok(read), "found again");
        let mut other = sent.clone();
        other.replace_range(40..41, "B");
        assert_ne!(as_sent(&other).thumbprint(), Ok(read));
        for problem in [CertificateProblem::TooLarge, CertificateProblem::NotOnePem] {
            assert_eq!(
                CertificateProblem::from_word(problem.as_str()),
                Some(problem)
            );
            assert_eq!(
                ClientCertificate::Unreadable(problem).thumbprint(),
                Err(problem)
            );
        }
    }

    fn url_encoded_text(pem: &str) -> String {
        percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string()
    }
}
