//! Risk signals: what the policy's `risk:` section counts, per which key, and what crossing a
//! threshold does. The counters themselves are [`Table`]s, one per signal, kept across reloads
//! for a signal whose name and shape did not change.

use std::{borrow::Cow, net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;
use ipnet::IpNet;

use super::counters::{Change, Counting, Table};
use crate::{
    decision::{Decision, Outcome, Reason},
    policy::Requirement,
    request::AccessRequest,
};

/// The compiled `risk:` section.
#[derive(Debug)]
pub struct RiskPolicy {
    pub store: StoreSpec,
    pub on_store_failure: StoreFailure,
    pub max_keys: usize,
    pub signals: Vec<Signal>,
}

impl Default for RiskPolicy {
    fn default() -> Self {
        Self {
            store: StoreSpec::Memory,
            on_store_failure: StoreFailure::KeepLast,
            max_keys: 100_000,
            signals: Vec::new(),
        }
    }
}

/// Where blocks, revocations and counters are shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// In this replica's memory only.
    Memory,
    /// A Redis server (`redis://` or `rediss://` URL), or the primary Redis Sentinel names
    /// (`redis+sentinel://`), shared by every replica.
    Redis(String),
}

impl StoreSpec {
    /// `memory`, or a `redis://`/`rediss://` URL the Redis client accepts, or a Sentinel URL
    /// (`redis+sentinel://host:26379,host:26379/<primary name>[/<db>]`).
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.trim() {
            "memory" => Ok(Self::Memory),
            url if [
                "redis://",
                "rediss://",
                "redis+unix://",
                "unix://",
                "redis+sentinel://",
                "rediss+sentinel://",
            ]
            .iter()
            .any(|scheme| url.starts_with(scheme)) =>
            {
                let spec = Self::Redis(url.to_owned());
                super::redis::Target::open(url)
                    .map(|_| spec.clone())
                    .map_err(|e| format!("{} is not a usable Redis URL: {e}", spec.redacted()))
            }
            other => Err(format!(
                "expected `memory` or a redis://, rediss://, redis+unix:// or redis+sentinel:// \
                 URL, got {:?}",
                Self::Redis(other.to_owned()).redacted()
            )),
        }
    }

    /// The URL with any password replaced, for logs.
    pub fn redacted(&self) -> String {
        match self {
            Self::Memory => "memory".to_owned(),
            Self::Redis(url) => {
                // The user information ends at the URL's last `@`: a password may hold `?`, `/`
                // or `#` (unencoded, the URL does not parse, and its text is shown in the error).
                let (scheme, rest) = url.split_once("://").unwrap_or(("", url.as_str()));
                let (masked, rest) = match rest.rsplit_once('@') {
                    Some((_, after)) => ("***@", after),
                    None => ("", rest),
                };
                // A Unix socket URL carries its credentials in the query (`?pass=`, `?user=`):
                // only the database and protocol are shown.
                let (address, query) = match rest.split_once('?') {
                    Some((address, query)) => (address, Some(query)),
                    None => (rest, None),
                };
                let separator = if scheme.is_empty() { "" } else { "://" };
                let mut shown = format!("{scheme}{separator}{masked}{address}");
                if let Some(query) = query {
                    let pairs: Vec<String> = query
                        .split('&')
                        .map(|pair| match pair.split_once('=') {
                            Some((name @ ("db" | "protocol"), value)) => format!("{name}={value}"),
                            Some((name, _)) => format!("{name}=***"),
                            None => pair.to_owned(),
                        })
                        .collect();
                    shown = format!("{shown}?{}", pairs.join("&"));
                }
                shown
            }
        }
    }
}

/// What decisions do while the shared store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Decide from the last known blocks and revocations; count locally.
    KeepLast,
    /// Refuse every request (503 `risk_store_unavailable`).
    FailClosed,
}

/// What a signal counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// DENY outcomes (but those of a block: they are its consequence, not a new signal).
    Deny,
    /// STEP_UP outcomes.
    StepUp,
    /// Tokens refused as invalid: malformed, forged, expired, of an unknown issuer…
    InvalidToken,
    /// Distinct source addresses a verified token (or subject) is presented from.
    Sources,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::StepUp => "step_up",
            Self::InvalidToken => "invalid_token",
            Self::Sources => "sources",
        }
    }
}

/// What a signal counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Subject,
    Source,
    ClientId,
    Tenant,
    /// The token's fingerprint.
    Token,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subject => "subject",
            Self::Source => "source",
            Self::ClientId => "client_id",
            Self::Tenant => "tenant",
            Self::Token => "token",
        }
    }
}

/// What happens while a count is at or past its threshold.
#[derive(Debug)]
pub enum Action {
    /// A log line and a metric when the threshold is crossed; nothing is enforced (shadow).
    Log,
    /// Every protected route asks this of the key's requests (on top of the rule's requirement).
    StepUp(Box<Requirement>),
    /// The key is blocked for this many seconds when the threshold is crossed.
    Block { seconds: i64 },
}

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::StepUp(_) => "step_up",
            Self::Block { .. } => "block",
        }
    }
}

#[derive(Debug)]
pub struct Signal {
    pub name: Arc<str>,
    pub description: String,
    pub event: Event,
    pub key: KeyKind,
    pub window_seconds: u64,
    pub threshold: u32,
    pub action: Action,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    /// See [`Self::distinct_grouping`]; told once here.
    grouping: Option<Arc<str>>,
    table: ArcSwap<Table>,
}

/// The parts of a request and its decision a signal's key is taken from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keys<'a> {
    /// Only from a verified token.
    pub subject: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub token: Option<&'a str>,
    /// The source address (Envoy's `source.address`).
    pub source: Option<&'a str>,
}

impl<'a> Keys<'a> {
    /// The keys of a decided request. Subject, tenant, client and token only come from a
    /// verified token: an invalid token's claims are the sender's to choose.
    pub fn of(request: &'a AccessRequest, decision: &'a Decision) -> Self {
        let principal = decision.principal.as_deref();
        Self {
            subject: principal.map(|p| &*p.subject),
            tenant: principal.and_then(|p| p.tenant.as_deref()),
            client_id: principal.and_then(|p| p.client_id.as_deref()),
            token: principal.and(decision.token_fingerprint.as_deref()),
            source: request.source.as_ref().map(|s| s.address.as_str()),
        }
    }
}

/// A signal whose count reached its threshold with an event, and for which key.
#[derive(Debug, Clone)]
pub struct Crossing {
    pub signal: usize,
    pub key: String,
    pub count: u64,
    /// This event took the count to the threshold. A `block` signal's key counted again while
    /// at or over it (its block over, lifted, or never set: a signal turned from `log` to
    /// `block` by a reload) is a crossing too, not fresh: it is blocked if no block is in force.
    pub fresh: bool,
}

impl Signal {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        description: String,
        event: Event,
        key: KeyKind,
        window_seconds: u64,
        threshold: u32,
        action: Action,
        (ipv4_prefix, ipv6_prefix): (u8, u8),
        max_keys: usize,
    ) -> Self {
        let counting = match event {
            Event::Sources => Counting::Distinct,
            _ => Counting::Events,
        };
        Self {
            name: Arc::from(name),
            description,
            event,
            key,
            window_seconds,
            threshold,
            action,
            ipv4_prefix,
            ipv6_prefix,
            grouping: (event == Event::Sources && (ipv4_prefix, ipv6_prefix) != (32, 128))
                .then(|| Arc::from(format!("v4/{ipv4_prefix}v6/{ipv6_prefix}"))),
            table: ArcSwap::from_pointee(Table::new(counting, window_seconds * 1000, max_keys)),
        }
    }

    /// This signal's counters.
    pub fn table(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    /// Keeps `old`'s counters when they count the same thing the same way.
    fn inherit(&self, old: &Signal, max_keys_same: bool) {
        if max_keys_same
            && old.event == self.event
            && old.key == self.key
            && old.window_seconds == self.window_seconds
            && old.ipv4_prefix == self.ipv4_prefix
            && old.ipv6_prefix == self.ipv6_prefix
        {
            self.table.store(old.table.load_full());
        }
    }

    /// This signal's key in `keys`, if the request has one: a source as its network
    /// (`203.0.113.0/24`, or `/32` for one address).
    pub fn key_of<'k>(&self, keys: &Keys<'k>) -> Option<Cow<'k, str>> {
        let key = match self.key {
            KeyKind::Subject => keys.subject.map(Cow::Borrowed),
            KeyKind::Tenant => keys.tenant.map(Cow::Borrowed),
            KeyKind::ClientId => keys.client_id.map(Cow::Borrowed),
            KeyKind::Token => keys.token.map(Cow::Borrowed),
            KeyKind::Source => self.network_of(keys.source?).map(Cow::Owned),
        };
        // An empty claim (a token without `sub`, or with `sub: ""`) names nobody: counted under
        // one key, every such token of every issuer and client would share its count (one
        // caller's denials stepping up another's), and its block could not be set.
        key.filter(|key| !key.is_empty())
    }

    /// The network `source` is counted as (`ipv4_prefix`, `ipv6_prefix`): a `key: source`
    /// signal's key, and a `count: sources` signal's distinct value, so that one phone's
    /// rotating IPv6 privacy addresses in its /64 are one source. `None` for what is not an IP
    /// address. Already canonical where the request was made (`request::Peer::new`); an
    /// operator's `admin counts --source` may name the mapped form.
    fn network_of(&self, source: &str) -> Option<String> {
        let address = source.parse::<IpAddr>().ok()?.to_canonical();
        let prefix = match address {
            IpAddr::V4(_) => self.ipv4_prefix,
            IpAddr::V6(_) => self.ipv6_prefix,
        };
        let network = IpNet::new(address, prefix).ok()?.trunc();
        Some(match network {
            IpNet::V4(v4) => v4_network_text(v4.addr().octets(), v4.prefix_len()),
            IpNet::V6(v6) => v6.to_string(),
        })
    }

    /// A `count: sources` signal's distinct value for `source`: its network, or the address
    /// itself when the prefix is the whole address (as versions before the grouping counted it).
    /// What is not an IP address (a direct `Check` caller may name anything) is counted as
    /// written.
    fn distinct_of(&self, source: &str) -> String {
        let Ok(address) = source.parse::<IpAddr>().map(|a| a.to_canonical()) else {
            return source.to_owned();
        };
        let whole = match address {
            IpAddr::V4(_) => self.ipv4_prefix == 32,
            IpAddr::V6(_) => self.ipv6_prefix == 128,
        };
        if whole {
            return address.to_string();
        }
        self.network_of(source)
            .unwrap_or_else(|| address.to_string())
    }

    /// How a `count: sources` signal groups its distinct values, when not by whole address: the
    /// shared store keeps such counts apart (`None` for whole addresses, as before the grouping),
    /// so replicas grouping differently (a rolling upgrade, a reload changing the prefixes) never
    /// add one source's two spellings into one count.
    pub fn distinct_grouping(&self) -> Option<&str> {
        self.grouping.as_deref()
    }

    /// Whether this decision is an event this signal counts.
    fn counts(&self, request: &AccessRequest, decision: &Decision) -> bool {
        if matches!(
            decision.reason,
            Reason::Blocked | Reason::SourceBlocked | Reason::RiskStoreUnavailable
        ) {
            return false;
        }
        // A revoked session's token is no longer its user's: whoever still presents it (a thief)
        // must not push the user's subject, tenant or client to a block or a step-up. Its own
        // fingerprint and the network it comes from still count.
        if decision.reason == Reason::SessionRevoked
            && matches!(
                self.key,
                KeyKind::Subject | KeyKind::Tenant | KeyKind::ClientId
            )
        {
            return false;
        }
        match self.event {
            Event::Deny => decision.outcome == Outcome::Deny,
            Event::StepUp => decision.outcome == Outcome::StepUp,
            Event::InvalidToken => decision.reason.is_invalid_token(),
            Event::Sources => decision.principal.is_some() && request.source.is_some(),
        }
    }

    /// The count for `key` at `now_ms`.
    pub fn count(&self, key: &str, now_ms: i64) -> u64 {
        self.table().count(key, now_ms)
    }

    /// Whether `count` is at or past the threshold.
    pub fn reached(&self, count: u64) -> bool {
        count >= u64::from(self.threshold)
    }
}

/// An IPv4 network as `IpNet` writes it (`203.0.113.0/24`), without the formatting machinery:
/// a source signal's key is built on every request it reads.
fn v4_network_text(octets: [u8; 4], prefix: u8) -> String {
    use crate::telemetry::line::digits;
    let mut out = String::with_capacity(18);
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        digits(u64::from(octet), 1, &mut out);
    }
    out.push('/');
    digits(u64::from(prefix), 1, &mut out);
    out
}

impl RiskPolicy {
    /// Takes over the counters of `old`'s signals that count the same way (a reload keeps them).
    pub fn inherit(&self, old: &RiskPolicy) {
        for signal in &self.signals {
            if let Some(previous) = old.signals.iter().find(|s| s.name == signal.name) {
                signal.inherit(previous, old.max_keys == self.max_keys);
            }
        }
    }

    /// The signal named `name`.
    pub fn signal(&self, name: &str) -> Option<&Signal> {
        self.signals.iter().find(|s| &*s.name == name)
    }

    /// Adds to `decision.risk_counts` every signal's count for the request's key that the
    /// decision did not read itself (a signal that only logs, or acts on another outcome), read
    /// before this request is counted: its record then holds what a policy that enforces the
    /// signal would have read, and replay previews that change.
    pub fn read_for_record(&self, request: &AccessRequest, decision: &mut Decision, now_ms: i64) {
        if self.signals.is_empty() {
            return;
        }
        let keys = Keys::of(request, decision);
        let mut read = Vec::new();
        for signal in &self.signals {
            if decision
                .risk_counts
                .iter()
                .any(|(name, _)| *name == signal.name)
            {
                continue;
            }
            // An idle signal (no key counted) reads 0 for every key: its key is not built.
            if signal.table().is_empty() {
                continue;
            }
            let Some(key) = signal.key_of(&keys) else {
                continue;
            };
            let count = signal.count(&key, now_ms);
            if count > 0 {
                read.push((Arc::clone(&signal.name), count));
            }
        }
        decision.risk_counts.extend(read);
    }

    /// Counts a decided request in every signal it is an event of; `counted` hears of each count
    /// that changed (for the shared store). Returns the signals whose threshold this event reached.
    pub fn record(
        &self,
        request: &AccessRequest,
        decision: &Decision,
        now_ms: i64,
        mut counted: impl FnMut(usize, &str, Option<&str>),
    ) -> Vec<Crossing> {
        if self.signals.is_empty() {
            return Vec::new();
        }
        let keys = Keys::of(request, decision);
        let mut crossings = Vec::new();
        for (i, signal) in self.signals.iter().enumerate() {
            if !signal.counts(request, decision) {
                continue;
            }
            let Some(key) = signal.key_of(&keys) else {
                continue;
            };
            let distinct = match signal.event {
                // A direct `Check` caller may name what is no address: counted as written.
                Event::Sources => keys.source.map(|source| signal.distinct_of(source)),
                _ => None,
            };
            let change: Change = signal.table().record(&key, distinct.as_deref(), now_ms);
            // Every event is shared; a distinct value only when it is new in the window here
            // (a token seen again from the same address changes no count).
            if signal.event != Event::Sources || change.after != change.before {
                counted(i, &key, distinct.as_deref());
            }
            let threshold = u64::from(signal.threshold);
            let fresh = change.crossed(threshold);
            let over = matches!(signal.action, Action::Block { .. }) && change.after >= threshold;
            if fresh || over {
                crossings.push(Crossing {
                    signal: i,
                    key: key.into_owned(),
                    count: change.after,
                    fresh,
                });
            }
        }
        crossings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Written as `IpNet` writes it, for every address and prefix.
        #[test]
        fn a_v4_network_reads_as_ipnet_writes_it(address: u32, prefix in 0..=32u8) {
            let network = ipnet::Ipv4Net::new(address.into(), prefix).unwrap().trunc();
            proptest::prop_assert_eq!(
                v4_network_text(network.addr().octets(), prefix),
                network.to_string()
            );
        }
    }
    use crate::{
        decision::{Decision, Outcome, Reason},
        identity::Principal,
        request::Peer,
    };

    const NOW_MS: i64 = 1_800_000_000_000;

    fn signal(event: Event, key: KeyKind) -> Signal {
        Signal::new(
            "s",
            String::new(),
            event,
            key,
            600,
            3,
            Action::Block { seconds: 3600 },
            (32, 64),
            1000,
        )
    }

    #[test]
    fn a_store_urls_credentials_are_not_shown() {
        let shown = |url: &str| StoreSpec::parse(url).unwrap().redacted();
        assert_eq!(
            shown("redis://:hunter2@redis:6379/0"),
            "redis://***@redis:6379/0"
        );
        assert_eq!(
            shown("redis+unix:///run/redis.sock?db=2&pass=hunter2&user=app"),
            "redis+unix:///run/redis.sock?db=2&pass=***&user=***"
        );
        assert_eq!(shown("redis://redis:6379/0"), "redis://redis:6379/0");
        // A password holding `?` (or `/`): the URL does not parse, and its error shows neither.
        for url in [
            "redis://:hunter?2secret@redis:6379/0",
            "redis://:hunter/2secret@redis:6379/0",
        ] {
            let shown = StoreSpec::Redis(url.to_owned()).redacted();
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.starts_with("redis://***@redis:6379"), "{shown}");
            if let Err(error) = StoreSpec::parse(url) {
                assert!(!error.contains("secret"), "{error}");
            }
        }
        assert_eq!(shown("memory"), "memory");
    }

    #[test]
    fn a_sentinel_url_names_the_sentinels_and_the_primary() {
        for url in [
            "redis+sentinel://sentinel-0:26379/mymaster",
            "redis+sentinel://:hunter2@s0:26379,s1:26379,s2:26379/mymaster/2",
            "rediss+sentinel://app:hunter2@[2001:db8::1]:26379/mymaster/0",
            "redis+sentinel://s0,[2001:db8::1]/mymaster/",
        ] {
            assert!(StoreSpec::parse(url).is_ok(), "{url}");
        }
        assert_eq!(
            StoreSpec::parse("redis+sentinel://:hunter2@s0:26379,s1:26379/mymaster")
                .unwrap()
                .redacted(),
            "redis+sentinel://***@s0:26379,s1:26379/mymaster"
        );
        for (url, says) in [
            ("redis+sentinel://s0:26379", "names the primary"),
            ("redis+sentinel://s0:26379/", "name"),
            ("redis+sentinel://s0:26379/m/x", "database"),
            ("redis+sentinel://s0:26379/m/-1", "database"),
            ("redis+sentinel://s0:26379/m?db=1", "query"),
            ("redis+sentinel:///m", "at least one sentinel"),
            (
                "redis+sentinel://:hunter2@s0:26379,/m",
                "at least one sentinel",
            ),
            ("redis+sentinel://:hunter2@s0:x/m", "not a usable"),
            ("redis+sentinel://:hunter2@s0:26379,s1:x/m", "not a usable"),
        ] {
            let error = StoreSpec::parse(url).unwrap_err();
            assert!(error.contains(says), "{url}: {error}");
            assert!(!error.contains("hunter2"), "{url}: {error}");
        }
    }

    /// `stepgate admin counts --source ::ffff:203.0.113.7` names the key the request path counts
    /// for that client, and two spellings of one IPv6 address are one distinct source.
    #[test]
    fn a_source_is_one_key_and_one_value_however_it_is_spelled() {
        let s = signal(Event::InvalidToken, KeyKind::Source);
        let key = |source: &str| {
            s.key_of(&Keys {
                source: Some(source),
                ..Keys::default()
            })
            .unwrap()
            .into_owned()
        };
        let request_path = Peer::new("::ffff:203.0.113.7", String::new());
        assert_eq!(request_path.address, "203.0.113.7");
        assert_eq!(key("::ffff:203.0.113.7"), key(&request_path.address));
        assert_eq!(key("203.0.113.7"), "203.0.113.7/32");
        assert_eq!(
            Peer::new("2001:DB8:0:0::1", String::new()).address,
            Peer::new("2001:db8::1", String::new()).address
        );
    }

    /// `count: sources` counts networks as `key: source` does: a phone's rotating IPv6 privacy
    /// addresses in its /64 are one source (so `token_replay` does not block its own user), and
    /// addresses in three /64s are three.
    #[test]
    fn distinct_sources_are_counted_by_network() {
        let risk = RiskPolicy {
            signals: vec![signal(Event::Sources, KeyKind::Token)],
            ..RiskPolicy::default()
        };
        let mut allowed = Decision::new(Outcome::Allow, Reason::Allowed, "", 200);
        allowed.principal = Some(Arc::new(Principal {
            subject: Arc::from("alice"),
            ..Principal::default()
        }));
        allowed.token_fingerprint = Some("t1".into());
        let from = |address: &str, at: i64| {
            let request = AccessRequest {
                source: Some(Peer::new(address, String::new())),
                ..AccessRequest::default()
            };
            risk.record(&request, &allowed, NOW_MS + at, |_, _, _| {})
        };
        for (i, address) in ["2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::1"]
            .into_iter()
            .enumerate()
        {
            assert!(from(address, i as i64).is_empty(), "{address}");
        }
        assert_eq!(risk.signals[0].count("t1", NOW_MS + 10), 1);
        from("2001:db8:1:3::a", 11);
        let crossed = from("2001:db8:9:9::a", 12);
        assert_eq!(crossed.len(), 1, "three networks cross the threshold of 3");

        // What is shared: an IPv4 address (a whole /32) as the address itself, as before the
        // grouping, and an IPv6 one as its /64, in a count kept apart by its grouping.
        let mut shared = Vec::new();
        for address in ["192.0.2.7", "2001:db8:7::1"] {
            let request = AccessRequest {
                source: Some(Peer::new(address, String::new())),
                ..AccessRequest::default()
            };
            risk.record(&request, &allowed, NOW_MS + 20, |_, _, distinct| {
                shared.push(distinct.map(str::to_owned));
            });
        }
        assert_eq!(
            shared,
            [
                Some("192.0.2.7".to_owned()),
                Some("2001:db8:7::/64".to_owned())
            ]
        );
        assert_eq!(risk.signals[0].distinct_grouping(), Some("v4/32v6/64"));
        let whole = Signal::new(
            "s",
            String::new(),
            Event::Sources,
            KeyKind::Token,
            600,
            3,
            Action::Log,
            (32, 128),
            1000,
        );
        assert_eq!(whole.distinct_grouping(), None, "as before the grouping");
        assert_eq!(
            signal(Event::Deny, KeyKind::Source).distinct_grouping(),
            None
        );
    }

    /// Whoever still holds a token whose session the operator revoked is not its user: its
    /// refusals must not push the user to a block, but still count against the token itself
    /// and the networks it comes from.
    #[test]
    fn a_revoked_sessions_refusals_count_against_the_token_and_source_not_the_user() {
        let risk = RiskPolicy {
            signals: vec![
                signal(Event::Deny, KeyKind::Subject),
                signal(Event::Sources, KeyKind::Subject),
                signal(Event::Deny, KeyKind::Source),
                signal(Event::Sources, KeyKind::Token),
            ],
            ..RiskPolicy::default()
        };
        let mut revoked = Decision::refusal(401, Reason::SessionRevoked, "revoked");
        revoked.principal = Some(Arc::new(Principal {
            subject: Arc::from("alice"),
            ..Principal::default()
        }));
        revoked.token_fingerprint = Some("t1".into());
        let mut crossed = Vec::new();
        for i in 0..3 {
            let request = AccessRequest {
                source: Some(Peer::new("198.51.100.7", String::new())),
                ..AccessRequest::default()
            };
            let elsewhere = AccessRequest {
                source: Some(Peer::new(&format!("203.0.113.{i}"), String::new())),
                ..AccessRequest::default()
            };
            crossed.extend(risk.record(&request, &revoked, NOW_MS + i, |_, _, _| {}));
            crossed.extend(risk.record(&elsewhere, &revoked, NOW_MS + i, |_, _, _| {}));
        }
        let signals: Vec<usize> = crossed.iter().map(|c| c.signal).collect();
        assert!(
            !signals.contains(&0) && !signals.contains(&1),
            "{crossed:?}"
        );
        assert!(signals.contains(&2), "the source still counts: {crossed:?}");
        assert!(signals.contains(&3), "the token still counts: {crossed:?}");
    }
}
