//! A configured token issuer: what its tokens must look like and the keys that verify them.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use jsonwebtoken::Algorithm;

use super::jwks::KeySet;

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
}

/// One issuer. Its key set is swapped atomically by the background refresher; a request reads the
/// current set without waiting.
#[derive(Debug)]
pub struct Issuer {
    pub id: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: u64,
    pub challenge: ChallengeStyle,
    pub entra: EntraChallenge,
    pub key_source: KeySource,
    pub refresh: Duration,
    keys: ArcSwap<KeySet>,
}

impl Issuer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        issuer: String,
        audiences: Vec<String>,
        algorithms: Vec<Algorithm>,
        leeway: u64,
        challenge: ChallengeStyle,
        entra: EntraChallenge,
        key_source: KeySource,
        refresh: Duration,
    ) -> Self {
        Self {
            id,
            issuer,
            audiences,
            algorithms,
            leeway,
            challenge,
            entra,
            key_source,
            refresh,
            keys: ArcSwap::from_pointee(KeySet::default()),
        }
    }

    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    pub fn set_keys(&self, keys: KeySet) {
        self.keys.store(Arc::new(keys));
    }
}

/// All issuers of a policy, looked up by the token's exact `iss`.
#[derive(Debug, Default)]
pub struct Issuers {
    by_iss: HashMap<String, Arc<Issuer>>,
    in_order: Vec<Arc<Issuer>>,
}

impl Issuers {
    pub fn new(issuers: Vec<Arc<Issuer>>) -> Self {
        let by_iss = issuers
            .iter()
            .map(|i| (i.issuer.clone(), Arc::clone(i)))
            .collect();
        Self {
            by_iss,
            in_order: issuers,
        }
    }

    pub fn by_iss(&self, iss: &str) -> Option<&Arc<Issuer>> {
        self.by_iss.get(iss)
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Issuer>> {
        self.in_order.iter().find(|i| i.id == id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Issuer>> {
        self.in_order.iter()
    }
}
