//! Throwaway PKI for the tests that speak TLS: a private CA made per test with rcgen, its server
//! and client certificates, and a temporary folder to write them to. Nothing is committed and
//! nothing expires between runs.

#![allow(dead_code)]

use std::{net::IpAddr, path::PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

/// A private CA made for one test.
pub struct Ca {
    pub issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM files would hold them.
pub struct Leaf {
    pub cert: String,
    pub key: String,
    pub der: CertificateDer<'static>,
    /// `notAfter`, Unix seconds.
    pub not_after: i64,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server's certificate for `names` (typed as [`san`] types them), valid until January 1st
    /// of `until_year`.
    pub fn server(&self, names: &[&str], until_year: i32) -> Leaf {
        self.leaf(
            "stepgate test server",
            names.iter().map(|name| san(name)).collect(),
            ExtendedKeyUsagePurpose::ServerAuth,
            until_year,
        )
    }

    /// A client certificate naming `sans` (a URI when it has a scheme, an IP address when it
    /// parses as one, a DNS name otherwise) and nothing else.
    pub fn client(&self, sans: &[&str]) -> Leaf {
        self.client_named("stepgate test client", sans)
    }

    /// As [`Ca::client`], with the subject's common name `cn`.
    pub fn client_named(&self, cn: &str, sans: &[&str]) -> Leaf {
        self.client_typed(cn, sans.iter().map(|name| san(name)).collect())
    }

    /// A client certificate naming `sans` as they are typed.
    pub fn client_typed(&self, cn: &str, sans: Vec<SanType>) -> Leaf {
        self.leaf(cn, sans, ExtendedKeyUsagePurpose::ClientAuth, 2040)
    }

    pub fn leaf(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        until_year: i32,
    ) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        params.not_after = rcgen::date_time_ymd(until_year, 1, 1);
        let key = KeyPair::generate().expect("a leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("signing a leaf certificate");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
            not_after: params.not_after.unix_timestamp(),
        }
    }
}

pub fn san(name: &str) -> SanType {
    let ia5 = || name.to_owned().try_into().expect("an ASCII name");
    if let Ok(ip) = name.parse::<IpAddr>() {
        SanType::IpAddress(ip)
    } else if name.contains("://") {
        SanType::URI(ia5())
    } else {
        SanType::DnsName(ia5())
    }
}

/// A temporary folder, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        Self {
            dir: crate::common::temp_dir(name),
        }
    }

    /// Writes `name` in the folder and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("writing a PEM file");
        path
    }

    /// `(cert, key)` of `leaf` as `<name>.crt` and `<name>.key`.
    pub fn leaf(&self, name: &str, leaf: &Leaf) -> (PathBuf, PathBuf) {
        (
            self.write(&format!("{name}.crt"), &leaf.cert),
            self.write(&format!("{name}.key"), &leaf.key),
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
