//! A configured token issuer: what its tokens must look like and the keys that verify them.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, LazyLock},
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use jsonwebtoken::Algorithm;
use tokio::sync::watch;

use super::{jwks::KeySet, keys::FetchControl};

/// The claim that names a token's subject ([`Principal::subject`](super::claims::Principal)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubjectClaim {
    #[default]
    Sub,
    /// Entra's object id: the same user (or service principal) whichever client asked.
    Oid,
}

impl SubjectClaim {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sub => "sub",
            Self::Oid => "oid",
        }
    }
}

/// How a missing or too-old authentication is answered for this issuer's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeStyle {
    /// Entra ID claims challenge (`insufficient_claims` + base64 `claims`), sent only to clients
    /// that declared the `cp1` capability.
    Entra,
    /// RFC 9470 `insufficient_user_authentication` with `acr_values` and `max_age`.
    Rfc9470,
    /// No challenge: the client cannot step up, so the answer is 403.
    Deny,
}

impl ChallengeStyle {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entra => "entra",
            Self::Rfc9470 => "rfc9470",
            Self::Deny => "deny",
        }
    }
}

/// Parameters of the Entra claims challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntraChallenge {
    pub authorization_uri: String,
    pub realm: String,
    pub client_id: Option<String>,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Uri(String),
    /// An OIDC discovery document (`…/.well-known/openid-configuration`) naming `issuer` and
    /// `jwks_uri`.
    Discovery(String),
}

impl KeySource {
    /// Whether keys can be fetched again on demand (an unknown `kid`).
    pub fn is_remote(&self) -> bool {
        !matches!(self, Self::File(_))
    }
}

/// The `iss` an issuer accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerName {
    /// Exactly this value.
    Exact(String),
    /// Entra multi-tenant: `https://login.microsoftonline.com/{tenantid}/v2.0` — a tenant GUID in
    /// place of `{tenantid}`, which must equal the token's `tid`.
    Template { prefix: String, suffix: String },
    /// Learned from the discovery document at start-up (nothing matches before that).
    Discovered,
}

impl IssuerName {
    pub const TENANT_PLACEHOLDER: &'static str = "{tenantid}";

    pub fn parse(text: &str) -> Self {
        match text.split_once(Self::TENANT_PLACEHOLDER) {
            Some((prefix, suffix)) => Self::Template {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
            },
            None if text.is_empty() => Self::Discovered,
            None => Self::Exact(text.to_owned()),
        }
    }
}

/// Which tenants a templated (multi-tenant) issuer accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenants {
    /// Single-tenant issuer: no tenant check beyond the exact `iss`.
    NotApplicable,
    /// These tenant ids (lower-case GUIDs).
    Only(BTreeSet<String>),
    /// Any tenant (an explicit switch in the policy).
    Any,
}

/// When keys are fetched and for how long they are trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTiming {
    /// Refresh interval when the response carries no usable `Cache-Control: max-age`.
    pub refresh: Duration,
    /// Bounds on a `max-age`-derived interval.
    pub min_refresh: Duration,
    pub max_refresh: Duration,
    /// First retry after a failure (doubling up to `refresh`).
    pub retry: Duration,
    /// How long the last good key set is kept while refreshes fail.
    pub max_stale: Duration,
    /// At most one on-demand fetch per this period (an unknown `kid`), failures included.
    pub unknown_kid_cooldown: Duration,
    /// How long a request with an unknown `kid` waits for that fetch.
    pub unknown_kid_wait: Duration,
}

impl Default for KeyTiming {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(3600),
            min_refresh: Duration::from_secs(300),
            max_refresh: Duration::from_secs(86_400),
            retry: Duration::from_secs(15),
            max_stale: Duration::from_secs(86_400),
            unknown_kid_cooldown: Duration::from_secs(30),
            unknown_kid_wait: Duration::from_millis(100),
        }
    }
}

/// Everything configured about an issuer (what `policy::compile` produces).
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub id: String,
    /// The `issuer` as written in the policy (may hold `{tenantid}`, or be empty with discovery).
    pub issuer: String,
    pub tenants: Tenants,
    pub audiences: Vec<String>,
    /// Those of `audiences` that are the admin API's (`admin.audiences`, for an issuer among
    /// `admin.issuers`): a token meant for none but these is refused by `Check` and `Decide`.
    pub admin_audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: u64,
    /// Refuse tokens carrying an ID token's own members (`nonce`, `at_hash`, `c_hash`).
    pub refuse_id_tokens: bool,
    /// Only `typ: at+jwt` tokens (RFC 9068).
    pub require_at_jwt: bool,
    /// Accept tokens bound to a key (`cnf`) as bearer tokens.
    pub accept_bound_tokens: bool,
    /// The claim that names the subject.
    pub subject_claim: SubjectClaim,
    pub challenge: ChallengeStyle,
    pub entra: EntraChallenge,
    pub key_source: KeySource,
    pub timing: KeyTiming,
    /// The HTTP client for this issuer's discovery and keys when it trusts its own CAs
    /// (`ca_file`); `None`: the shared client.
    pub http: Option<reqwest::Client>,
    /// SHA-256 of the CA bundle `http` trusts (`None`: the shared client's roots): a reload that
    /// changes it fetches the keys again rather than keep those fetched under the old trust.
    pub trust: Option<[u8; 32]>,
}

/// One issuer: its settings and its current keys. The key set is swapped atomically by the
/// background refresher; a request reads the current set without waiting.
#[derive(Debug)]
pub struct Issuer {
    /// Shared: every verified token's principal names it (cloning is a reference count).
    pub id: Arc<str>,
    /// The `issuer` as written in the policy.
    pub issuer: String,
    pub name: IssuerName,
    pub tenants: Tenants,
    pub audiences: Vec<String>,
    /// See [`IssuerSettings::admin_audiences`].
    pub admin_audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: u64,
    pub refuse_id_tokens: bool,
    /// Only `typ: at+jwt` tokens (RFC 9068).
    pub require_at_jwt: bool,
    /// See [`IssuerSettings::accept_bound_tokens`].
    pub accept_bound_tokens: bool,
    pub subject_claim: SubjectClaim,
    pub challenge: ChallengeStyle,
    pub entra: EntraChallenge,
    pub key_source: KeySource,
    pub timing: KeyTiming,
    /// See [`IssuerSettings::http`].
    pub http: Option<reqwest::Client>,
    /// See [`IssuerSettings::trust`].
    pub trust: Option<[u8; 32]>,
    keys: ArcSwap<KeySet>,
    /// `issuer` and `jwks_uri` from the discovery document, once read.
    discovered: ArcSwapOption<Discovered>,
    pub(crate) fetch: FetchControl,
}

/// What an OIDC discovery document said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub issuer: String,
    pub name: IssuerName,
    pub jwks_uri: String,
}

impl Issuer {
    pub fn new(settings: IssuerSettings) -> Self {
        Self {
            name: IssuerName::parse(&settings.issuer),
            id: settings.id.into(),
            issuer: settings.issuer,
            tenants: settings.tenants,
            audiences: settings.audiences,
            admin_audiences: settings.admin_audiences,
            algorithms: settings.algorithms,
            leeway: settings.leeway,
            refuse_id_tokens: settings.refuse_id_tokens,
            require_at_jwt: settings.require_at_jwt,
            accept_bound_tokens: settings.accept_bound_tokens,
            subject_claim: settings.subject_claim,
            challenge: settings.challenge,
            entra: settings.entra,
            key_source: settings.key_source,
            timing: settings.timing,
            http: settings.http,
            trust: settings.trust,
            keys: ArcSwap::from_pointee(KeySet::default()),
            discovered: ArcSwapOption::empty(),
            fetch: FetchControl::default(),
        }
    }

    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// Whether the key set still holds the key `kid` with this binding (material, `alg`,
    /// `issuer`). Reads the set without taking a reference on it (no shared write: the
    /// verified-token cache asks on every hit).
    pub fn key_published(&self, kid: Option<&str>, binding: &[u8; 32]) -> bool {
        self.keys
            .load()
            .find(kid)
            .is_some_and(|key| key.binding == *binding)
    }

    pub fn set_keys(&self, keys: KeySet) {
        self.keys.store(Arc::new(keys));
        note_key_sets_changed();
    }

    pub fn discovered(&self) -> Option<Arc<Discovered>> {
        self.discovered.load_full()
    }

    pub fn set_discovered(&self, discovered: Discovered) {
        self.discovered.store(Some(Arc::new(discovered)));
    }

    /// Whether the issuer is Entra ID's, by its challenge style or its address (any cloud).
    pub fn is_entra(&self) -> bool {
        self.challenge == ChallengeStyle::Entra || self.at_entra_address()
    }

    /// Whether the issuer is at an Entra ID address (any cloud).
    pub fn at_entra_address(&self) -> bool {
        const ENTRA_HOSTS: [&str; 6] = [
            "login.microsoftonline.com",
            "sts.windows.net",
            "login.microsoftonline.us",
            "login.partner.microsoftonline.cn",
            "login.chinacloudapi.cn",
            "sts.chinacloudapi.cn",
        ];
        let host = self
            .issuer
            .strip_prefix("https://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_ascii_lowercase();
        ENTRA_HOSTS.contains(&host.as_str())
    }

    /// Whether a token's `iss` names this issuer. For a template, also returns the tenant id the
    /// `iss` carries (lower-case).
    pub fn matches_iss(&self, iss: &str) -> Option<Option<String>> {
        match &self.name {
            IssuerName::Discovered => self.discovered.load().as_ref()?.name.matches(iss),
            name => name.matches(iss),
        }
    }
}

/// Marked whenever an issuer's key set is replaced or a policy with other issuers is served, so
/// that readiness is worked out again when it can change, not on a timer.
static KEY_SETS_CHANGED: LazyLock<watch::Sender<()>> = LazyLock::new(|| watch::Sender::new(()));

/// Says that the key sets readiness depends on may have changed.
pub fn note_key_sets_changed() {
    KEY_SETS_CHANGED.send_replace(());
}

/// Sees each [`note_key_sets_changed`] after this call (in any policy of the process: a change
/// elsewhere only makes the receiver look again).
pub fn key_set_changes() -> watch::Receiver<()> {
    KEY_SETS_CHANGED.subscribe()
}

impl IssuerName {
    fn matches(&self, iss: &str) -> Option<Option<String>> {
        match self {
            Self::Exact(exact) => (exact == iss).then_some(None),
            Self::Template { prefix, suffix } => {
                let tenant = iss
                    .strip_prefix(prefix.as_str())?
                    .strip_suffix(suffix.as_str())?;
                is_guid(tenant).then(|| Some(tenant.to_ascii_lowercase()))
            }
            Self::Discovered => None,
        }
    }
}

/// A GUID in its 8-4-4-4-12 hex form.
pub fn is_guid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// All issuers of a policy. A token's `iss` selects one by hash lookup for exact issuers, and by
/// a scan of the few templated or discovered ones otherwise — never by trying keys.
#[derive(Debug, Default)]
pub struct Issuers {
    exact: HashMap<String, Arc<Issuer>>,
    patterned: Vec<Arc<Issuer>>,
    in_order: Vec<Arc<Issuer>>,
}

impl Issuers {
    pub fn new(issuers: Vec<Arc<Issuer>>) -> Self {
        let mut exact = HashMap::new();
        let mut patterned = Vec::new();
        for issuer in &issuers {
            match &issuer.name {
                IssuerName::Exact(iss) => {
                    exact.insert(iss.clone(), Arc::clone(issuer));
                }
                _ => patterned.push(Arc::clone(issuer)),
            }
        }
        // A discovered issuer names one exact `iss` (a `{tenantid}` one is refused when the
        // document is read): tried before the templates, as exact names are, so that a template
        // listed first cannot take a discovered tenant's tokens.
        patterned.sort_by_key(|issuer| matches!(issuer.name, IssuerName::Template { .. }));
        Self {
            exact,
            patterned,
            in_order: issuers,
        }
    }

    /// The issuer a token's `iss` names, with the tenant a templated `iss` carries.
    pub fn by_iss(&self, iss: &str) -> Option<(&Arc<Issuer>, Option<String>)> {
        if let Some(issuer) = self.exact.get(iss) {
            return Some((issuer, None));
        }
        self.patterned
            .iter()
            .find_map(|issuer| issuer.matches_iss(iss).map(|tenant| (issuer, tenant)))
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Issuer>> {
        self.in_order.iter().find(|i| &*i.id == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Issuer>> {
        self.in_order.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(text: &str) -> Issuer {
        Issuer::new(IssuerSettings {
            id: "t".into(),
            issuer: text.into(),
            tenants: Tenants::Any,
            audiences: vec!["a".into()],
            admin_audiences: Vec::new(),
            algorithms: vec![Algorithm::RS256],
            leeway: 60,
            refuse_id_tokens: true,
            require_at_jwt: false,
            accept_bound_tokens: false,
            subject_claim: SubjectClaim::Sub,
            challenge: ChallengeStyle::Entra,
            entra: EntraChallenge {
                authorization_uri: String::new(),
                realm: String::new(),
                client_id: None,
            },
            key_source: KeySource::Uri("https://x".into()),
            timing: KeyTiming::default(),
            http: None,
            trust: None,
        })
    }

    const TID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

    #[test]
    fn templates_match_a_guid_tenant_only() {
        let i = issuer("https://login.microsoftonline.com/{tenantid}/v2.0");
        let iss = format!("https://login.microsoftonline.com/{TID}/v2.0");
        assert_eq!(i.matches_iss(&iss), Some(Some(TID.to_owned())));
        assert_eq!(
            i.matches_iss("https://login.microsoftonline.com/common/v2.0"),
            None
        );
        assert_eq!(
            i.matches_iss(&format!("https://login.microsoftonline.com/{TID}/v2.0/x")),
            None
        );
        let v1 = issuer("https://sts.windows.net/{tenantid}/");
        assert!(
            v1.matches_iss(&format!("https://sts.windows.net/{TID}/"))
                .is_some()
        );
    }

    #[test]
    fn discovered_issuers_match_only_once_discovered() {
        let i = issuer("");
        assert_eq!(i.matches_iss("https://idp.example"), None);
        i.set_discovered(Discovered {
            issuer: "https://idp.example".into(),
            name: IssuerName::parse("https://idp.example"),
            jwks_uri: "https://idp.example/keys".into(),
        });
        assert_eq!(i.matches_iss("https://idp.example"), Some(None));
    }

    #[test]
    fn a_discovered_issuer_is_tried_before_a_template_listed_first() {
        let template = Arc::new(issuer("https://login.example/{tenantid}/v2.0"));
        let discovered = Arc::new(issuer(""));
        let own = format!("https://login.example/{TID}/v2.0");
        discovered.set_discovered(Discovered {
            issuer: own.clone(),
            name: IssuerName::parse(&own),
            jwks_uri: "https://login.example/keys".into(),
        });
        let issuers = Issuers::new(vec![Arc::clone(&template), Arc::clone(&discovered)]);
        let (found, tenant) = issuers.by_iss(&own).expect("the discovered issuer");
        assert!(Arc::ptr_eq(found, &discovered) && tenant.is_none());
        let other = own.replace(TID, "11111111-2222-4333-8444-555555555555");
        let (found, _) = issuers.by_iss(&other).expect("the template");
        assert!(Arc::ptr_eq(found, &template));
    }

    #[test]
    fn guids_are_8_4_4_4_12_hex() {
        assert!(is_guid(TID));
        assert!(is_guid(&TID.to_uppercase()));
        assert!(!is_guid("common"));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db4"));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47-"));
    }
}
