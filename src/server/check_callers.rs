//! Who may call ext_authz `Check` (`--check-from`, `--check-client-san`).
//!
//! A `Check` says where the request came from (`source.address`) and presents the user's token,
//! and stepgate believes it: source blocks apply to that address, and risk signals count it
//! (`key: source`, `count: sources`). A caller that is not the proxy could name any address and
//! trip those signals against a network or a user it does not own. With either list set, only
//! the peers it names may call `Check`; any other caller's `Check` is answered
//! `403 caller_not_allowed` without being read, so it decides, counts and blocks nothing. With
//! neither set, any peer that reaches the port may call it (the port's reachability is then the
//! boundary: docs/risk.md).
//!
//! The test is made once per connection, when it is accepted, not per call.

use std::net::SocketAddr;

use ipnet::IpNet;

use super::conn::PeerInfo;
use crate::{
    identity::san::{self, SanName},
    risk::blocks::{canonical_net, parse_net},
    telemetry::throttle::{Throttle, WARNING_PERIOD},
};

/// The callers `Check` answers; empty lists do not narrow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckCallers {
    /// The peer's address must be in one of these (IPv4-mapped IPv6 read as IPv4).
    networks: Vec<IpNet>,
    /// With mutual TLS: the client certificate must name one of these (of the same type).
    client_sans: Vec<SanName>,
}

impl CheckCallers {
    pub fn new(networks: Vec<IpNet>, client_sans: Vec<SanName>) -> Self {
        Self {
            networks: networks.into_iter().map(canonical_net).collect(),
            client_sans,
        }
    }

    /// Whether neither list narrows (every peer may call `Check`).
    pub fn is_open(&self) -> bool {
        self.networks.is_empty() && self.client_sans.is_empty()
    }

    /// The networks, comma-separated (`any` for none), for the log.
    pub fn networks_text(&self) -> String {
        list_text(self.networks.iter().map(ToString::to_string))
    }

    /// The client certificate names, comma-separated (`any` for none), for the log.
    pub fn client_sans_text(&self) -> String {
        list_text(self.client_sans.iter().map(ToString::to_string))
    }

    /// Whether `peer` may call `Check`: its address is in a listed network (when networks are
    /// listed) and its client certificate names a listed name (when names are listed).
    pub fn allows(&self, peer: &PeerInfo) -> bool {
        let in_network = self.networks.is_empty()
            || peer.remote.is_some_and(|remote| {
                let address = remote.ip().to_canonical();
                self.networks.iter().any(|net| net.contains(&address))
            });
        let named = self.client_sans.is_empty()
            || peer
                .client
                .as_ref()
                .is_some_and(|client| san::any_allowed(&client.sans, &self.client_sans));
        in_network && named
    }
}

/// Comma-separated, `any` for none: a list of who is admitted, for the log.
pub(super) fn list_text(items: impl Iterator<Item = String>) -> String {
    let text = items.collect::<Vec<_>>().join(",");
    if text.is_empty() {
        "any".to_owned()
    } else {
        text
    }
}

/// `--check-from`'s values: a network (`10.0.0.0/8`, `fd00::/8`) or one address (`10.1.2.3`).
/// A network with bits set past its prefix (`10.1.2.3/8`) is refused rather than guessed at: it
/// reads as one host to some and as the whole network to others, and an allow-list must not
/// grant more than was meant (a block, which errs on the wide side, drops the bits instead).
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let net = parse_net(text)
        .ok_or_else(|| format!("{text:?} is neither a network (10.0.0.0/8) nor an address"))?;
    if net.trunc() != net {
        return Err(format!(
            "{text} has bits set past its /{} prefix: write {} for the network or {} for the one address",
            net.prefix_len(),
            net.trunc(),
            net.addr()
        ));
    }
    Ok(net)
}

/// `--check-client-san`'s names against `--client-san`'s: each must be a name, and when the
/// handshake admits only `client_sans`, one of those (any other could never call `Check`).
pub fn check_client_sans(check_sans: &[SanName], client_sans: &[SanName]) -> Result<(), String> {
    match check_sans
        .iter()
        .find(|name| !client_sans.is_empty() && !client_sans.contains(name))
    {
        Some(name) => Err(format!(
            "--check-client-san {} name {:?} is not among --client-san: the handshake refuses every \
             certificate naming only it, so no proxy could call Check",
            name.kind(),
            name.to_string()
        )),
        None => Ok(()),
    }
}

/// Says that `remote`'s `Check` was refused: at most once per 10 s, with how many were refused
/// meanwhile (each is counted in the decision metrics as `caller_not_allowed`).
pub fn warn_refused(remote: Option<SocketAddr>) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    let Some(unlogged) = WARNINGS.admit() else {
        return;
    };
    let caller = remote.map_or_else(|| "an unknown peer".to_owned(), |r| r.ip().to_string());
    tracing::warn!(
        %caller,
        unlogged,
        "refused a Check: its caller is not among --check-from / --check-client-san (later ones within 10 s are only counted, as caller_not_allowed)"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::server::{conn::ListenerKind, tls::ClientIdentity};

    fn peer(address: &str, sans: Option<&[&str]>) -> PeerInfo {
        PeerInfo {
            remote: Some(SocketAddr::new(address.parse().unwrap(), 40000)),
            listener: ListenerKind::Main,
            client: sans.map(|sans| {
                Arc::new(ClientIdentity {
                    sans: names(sans),
                    thumbprint: None,
                })
            }),
        }
    }

    /// Certificate names (or allow-list entries), typed as an entry's text is.
    fn names(list: &[&str]) -> Vec<SanName> {
        list.iter()
            .map(|s| SanName::from_entry(s).unwrap())
            .collect()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| parse_network(n).unwrap()).collect()
    }

    #[test]
    fn open_by_default() {
        let any = CheckCallers::default();
        assert!(any.is_open());
        assert!(any.allows(&peer("203.0.113.9", None)));
        assert!(any.allows(&PeerInfo {
            remote: None,
            ..peer("::1", None)
        }));
    }

    #[test]
    fn networks_narrow_by_address_in_both_families() {
        let callers = CheckCallers::new(nets(&["10.0.0.0/8", "fd00::/8", "192.0.2.7"]), vec![]);
        assert!(!callers.is_open());
        assert!(callers.allows(&peer("10.200.3.4", None)));
        assert!(callers.allows(&peer("fd12::1", None)));
        assert!(callers.allows(&peer("192.0.2.7", None)));
        // A dual-stack listener shows IPv4 peers in IPv6's mapped form.
        assert!(callers.allows(&peer("::ffff:10.1.1.1", None)));
        assert!(!callers.allows(&peer("192.0.2.8", None)));
        assert!(!callers.allows(&peer("11.0.0.1", None)));
        assert!(!callers.allows(&peer("fe80::1", None)));
        assert!(!callers.allows(&PeerInfo {
            remote: None,
            ..peer("10.0.0.1", None)
        }));
    }

    #[test]
    fn a_mapped_network_is_the_ipv4_network() {
        let callers = CheckCallers::new(nets(&["::ffff:10.0.0.0/104"]), vec![]);
        assert!(callers.allows(&peer("10.9.9.9", None)));
        assert!(!callers.allows(&peer("11.0.0.1", None)));
    }

    #[test]
    fn names_narrow_by_client_certificate() {
        let callers = CheckCallers::new(vec![], names(&["spiffe://mesh/ns/gw/sa/envoy"]));
        assert!(callers.allows(&peer(
            "10.0.0.1",
            Some(&["x.example", "spiffe://mesh/ns/gw/sa/envoy"])
        )));
        assert!(!callers.allows(&peer("10.0.0.1", Some(&["spiffe://mesh/ns/app/sa/svc"]))));
        // A DNS name spelled like the SPIFFE identity is not it.
        assert!(!callers.allows(&PeerInfo {
            client: Some(Arc::new(ClientIdentity {
                sans: vec![SanName::dns("spiffe://mesh/ns/gw/sa/envoy")],
                thumbprint: None,
            })),
            ..peer("10.0.0.1", None)
        }));
        // Without a client certificate there is no name to match.
        assert!(!callers.allows(&peer("10.0.0.1", None)));
    }

    #[test]
    fn both_lists_must_agree() {
        let callers = CheckCallers::new(nets(&["10.0.0.0/8"]), names(&["gw"]));
        assert!(callers.allows(&peer("10.0.0.1", Some(&["gw"]))));
        assert!(!callers.allows(&peer("10.0.0.1", Some(&["svc"]))));
        assert!(!callers.allows(&peer("192.0.2.1", Some(&["gw"]))));
    }

    #[test]
    fn check_names_must_be_names_the_handshake_admits() {
        assert!(check_client_sans(&names(&["gw"]), &[]).is_ok());
        assert!(check_client_sans(&names(&["gw"]), &names(&["svc", "gw"])).is_ok());
        assert!(check_client_sans(&[], &names(&["svc"])).is_ok());
        let err = check_client_sans(&names(&["gw"]), &names(&["svc"])).unwrap_err();
        assert!(
            err.contains("dns name \"gw\" is not among --client-san"),
            "{err}"
        );
        // The same text as another type is another name.
        let uri = vec![SanName::Uri("gw".to_owned())];
        assert!(check_client_sans(&uri, &names(&["gw"])).is_err());
    }

    #[test]
    fn networks_are_read_strictly() {
        assert_eq!(
            parse_network("10.0.0.0/8").unwrap(),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            parse_network("2001:db8::1").unwrap(),
            "2001:db8::1/128".parse::<IpNet>().unwrap()
        );
        let err = parse_network("10.1.2.3/8").unwrap_err();
        assert!(
            err.contains("10.0.0.0/8") && err.contains("10.1.2.3"),
            "{err}"
        );
        for bad in ["", "10.0.0.0/33", "ten", "10.0.0.0/8 ", "*"] {
            assert!(parse_network(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
