//! Subject alternative names of client certificates, typed.
//!
//! A certificate's SAN is a DNS name, a URI (an Istio or SPIFFE identity) or an IP address, and
//! an allow-list entry (`--client-san`, `--check-client-san`, `admin.client_sans`,
//! `explain.client_sans`) admits a name of its own type only. Compared as plain strings, a DNS
//! name spelled `spiffe://cluster.local/ns/istio-system/sa/gateway` would pass for that SPIFFE
//! identity, and a CA that lets a requester choose its DNS names (cert-manager, a private ACME)
//! would hand out the gateway's identity. An entry's type is told from its text: an IP address is
//! one, a name with a `:` is a URI (a URI always has a scheme; a DNS name never has a colon),
//! anything else a DNS name. DNS names compare without regard to ASCII case (RFC 4343); URIs and
//! addresses compare exactly.

use std::{fmt, net::IpAddr};

/// One subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SanName {
    /// A `dNSName`, in ASCII lower case.
    Dns(String),
    /// A `uniformResourceIdentifier`, as written.
    Uri(String),
    /// An `iPAddress`.
    Ip(IpAddr),
}

impl SanName {
    /// A certificate's `dNSName`.
    pub fn dns(name: &str) -> Self {
        Self::Dns(name.to_ascii_lowercase())
    }

    /// An allow-list entry, typed by its text; an error says why the text names no certificate.
    pub fn from_entry(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("an empty name matches no certificate".to_owned());
        }
        if text.trim() != text || text.chars().any(char::is_control) {
            return Err(format!(
                "{text:?}: a subject alternative name has no surrounding spaces or control characters"
            ));
        }
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        if text.contains(':') {
            return Ok(Self::Uri(text.to_owned()));
        }
        if text.chars().any(char::is_whitespace) {
            return Err(format!("{text:?}: a DNS name has no spaces"));
        }
        Ok(Self::dns(text))
    }

    /// The kind of name, as logs and errors say it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dns(_) => "dns",
            Self::Uri(_) => "uri",
            Self::Ip(_) => "ip",
        }
    }
}

impl fmt::Display for SanName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) | Self::Uri(name) => f.write_str(name),
            Self::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Whether any of a certificate's `names` is among `allowed`.
pub fn any_allowed(names: &[SanName], allowed: &[SanName]) -> bool {
    names.iter().any(|name| allowed.contains(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_typed_by_their_text() {
        assert_eq!(
            SanName::from_entry("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            SanName::Uri("spiffe://cluster.local/ns/a/sa/b".to_owned())
        );
        assert_eq!(
            SanName::from_entry("10.0.0.7").unwrap(),
            SanName::Ip("10.0.0.7".parse().unwrap())
        );
        assert_eq!(
            SanName::from_entry("2001:db8::1").unwrap(),
            SanName::Ip("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            SanName::from_entry("Gateway.Example.COM").unwrap(),
            SanName::Dns("gateway.example.com".to_owned())
        );
        for bad in ["", " gw", "gw ", "g w", "gw\n", "a\u{7f}b"] {
            assert!(SanName::from_entry(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_name_admits_only_its_own_type() {
        let spiffe = "spiffe://cluster.local/ns/istio-system/sa/gateway";
        let allowed = [SanName::from_entry(spiffe).unwrap()];
        // A certificate whose dNSName is spelled like the URI is not that identity.
        assert!(!any_allowed(&[SanName::dns(spiffe)], &allowed));
        assert!(any_allowed(&[SanName::Uri(spiffe.to_owned())], &allowed));

        let ip = [SanName::from_entry("10.0.0.7").unwrap()];
        assert!(!any_allowed(&[SanName::dns("10.0.0.7")], &ip));
        assert!(any_allowed(
            &[SanName::Ip("10.0.0.7".parse().unwrap())],
            &ip
        ));

        let dns = [SanName::from_entry("gw.example.com").unwrap()];
        assert!(any_allowed(&[SanName::dns("GW.example.com")], &dns));
        assert!(!any_allowed(
            &[SanName::Uri("gw.example.com".to_owned())],
            &dns
        ));
    }
}
