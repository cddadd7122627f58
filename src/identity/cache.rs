//! The verified-token cache: a session reuses its access token for many requests, and Envoy asks
//! stepgate about every one of them, so a signature verified once is remembered.
//!
//! Bounded in entries (an unbounded JWT cache is a known out-of-memory attack) and in time (until
//! the token's `exp`, and at most `ttl`); keyed by the SHA-256 of the token, so the cache holds no
//! bearer credential; only successful verifications are cached. An entry is served only while its
//! signing key is still in the issuer's key set: when a key is removed from the JWKS, the tokens it
//! signed stop verifying at once. One cache per policy: a reload starts afresh, because issuers,
//! audiences or leeway may have changed.

use std::{sync::Arc, time::Duration};

use moka::{notification::RemovalCause, sync::Cache};
use sha2::{Digest, Sha256};

use super::{
    issuer::Issuers,
    token::{TokenError, VerifiedToken, verify},
};
use crate::telemetry::metrics;

/// SHA-256 of a token.
pub type TokenDigest = [u8; 32];

/// A cache of verified tokens (or a pass-through when built with zero entries).
pub struct TokenCache {
    cache: Option<Cache<TokenDigest, Arc<VerifiedToken>>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.cache.as_ref().map(Cache::entry_count))
            .finish()
    }
}

impl TokenCache {
    /// A cache of at most `max_entries` tokens, each kept at most `ttl`. Zero entries: no cache.
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        let cache = (max_entries > 0).then(|| {
            Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .eviction_listener(|_, _, cause| {
                    if matches!(cause, RemovalCause::Size | RemovalCause::Expired) {
                        metrics::global().record_token_cache("evicted");
                    }
                })
                .build()
        });
        Self { cache }
    }

    /// Verifies `token` at `now`, from the cache when it was verified before (and is still within
    /// its lifetime and its key still published). Returns the token's digest too, from which the
    /// fingerprint is derived without hashing again.
    pub fn verify(
        &self,
        token: &str,
        issuers: &Issuers,
        max_bytes: usize,
        now: i64,
    ) -> (TokenDigest, Result<Arc<VerifiedToken>, TokenError>) {
        let digest: TokenDigest = Sha256::digest(token.as_bytes()).into();
        let Some(cache) = &self.cache else {
            return (digest, verify(token, issuers, max_bytes, now).map(Arc::new));
        };
        if let Some(hit) = cache.get(&digest) {
            if still_valid(&hit, now) {
                metrics::global().record_token_cache("hit");
                return (digest, Ok(hit));
            }
            cache.invalidate(&digest);
        }
        metrics::global().record_token_cache("miss");
        let result = verify(token, issuers, max_bytes, now).map(Arc::new);
        if let Ok(verified) = &result {
            cache.insert(digest, Arc::clone(verified));
        }
        (digest, result)
    }

    pub fn entry_count(&self) -> u64 {
        self.cache.as_ref().map_or(0, Cache::entry_count)
    }
}

/// A cached verification holds while the token has not expired (with the issuer's leeway) and
/// its signing key is still in the issuer's current key set.
fn still_valid(token: &VerifiedToken, now: i64) -> bool {
    let leeway = token.issuer.leeway as i64;
    now <= token.principal.expires_at.saturating_add(leeway)
        && token
            .issuer
            .keys()
            .find(token.kid.as_deref())
            .is_some_and(|key| key.material == token.key_material)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use jsonwebtoken::Algorithm;

    use super::*;
    use crate::{
        demo::{self, DEMO_RSA_KID, TokenSpec},
        identity::jwks::KeySet,
        policy::Policy,
    };

    const NOW: i64 = 1_800_000_000;
    const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

    fn policy() -> Policy {
        let text = std::fs::read_to_string(format!("{MANIFEST}/examples/stepgate.yaml")).unwrap();
        let file = crate::config::parse(&text).unwrap();
        let policy = crate::policy::compile(&file, &Path::new(MANIFEST).join("examples")).unwrap();
        let jwks = std::fs::read(format!("{MANIFEST}/examples/demo-keys/jwks.json")).unwrap();
        for issuer in policy.issuers.iter() {
            issuer.set_keys(KeySet::parse(&jwks).unwrap().0);
        }
        policy
    }

    fn token(subject: &str) -> String {
        let pem = std::fs::read(format!(
            "{MANIFEST}/examples/demo-keys/demo-rsa-private.pem"
        ))
        .unwrap();
        let spec = TokenSpec {
            subject: subject.to_owned(),
            ..TokenSpec::default()
        };
        demo::sign(&spec.claims(NOW), &pem, Algorithm::RS256, DEMO_RSA_KID).unwrap()
    }

    #[test]
    fn second_verification_is_served_from_the_cache() {
        let p = policy();
        let cache = TokenCache::new(100, Duration::from_secs(600));
        let t = token("alice");
        let (d1, first) = cache.verify(&t, &p.issuers, 16_384, NOW);
        let (d2, second) = cache.verify(&t, &p.issuers, 16_384, NOW);
        assert_eq!(d1, d2);
        assert!(
            Arc::ptr_eq(&first.unwrap(), &second.unwrap()),
            "the same verified token"
        );
    }

    #[test]
    fn failures_are_never_cached() {
        let p = policy();
        let cache = TokenCache::new(100, Duration::from_secs(600));
        let mut t = token("alice");
        t.pop();
        t.push('A');
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_err());
        cache.cache.as_ref().unwrap().run_pending_tasks();
        assert_eq!(cache.entry_count(), 0);
    }

    #[test]
    fn a_cached_token_expires_with_its_exp() {
        let p = policy();
        let cache = TokenCache::new(100, Duration::from_secs(600));
        let t = token("alice");
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
        let later = NOW + 3600 + 61;
        assert_eq!(
            cache.verify(&t, &p.issuers, 16_384, later).1.unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn removing_the_signing_key_from_the_jwks_stops_serving_its_tokens() {
        let p = policy();
        let cache = TokenCache::new(100, Duration::from_secs(600));
        let t = token("alice");
        assert!(cache.verify(&t, &p.issuers, 16_384, NOW).1.is_ok());
        let only_ec = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"stepgate-demo-ec-1","x":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","y":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}"#;
        let (set, _) = KeySet::parse(only_ec.as_bytes()).unwrap();
        for issuer in p.issuers.iter() {
            issuer.set_keys(set.clone());
        }
        assert!(matches!(
            cache.verify(&t, &p.issuers, 16_384, NOW).1,
            Err(TokenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn the_cache_is_bounded_in_entries() {
        let p = policy();
        let cache = TokenCache::new(10, Duration::from_secs(600));
        for i in 0..100 {
            assert!(
                cache
                    .verify(&token(&format!("user{i}")), &p.issuers, 16_384, NOW)
                    .1
                    .is_ok()
            );
        }
        cache.cache.as_ref().unwrap().run_pending_tasks();
        assert!(cache.entry_count() <= 10, "{} entries", cache.entry_count());
    }

    #[test]
    fn zero_entries_turns_the_cache_off() {
        let p = policy();
        let cache = TokenCache::new(0, Duration::from_secs(600));
        let t = token("alice");
        let (_, first) = cache.verify(&t, &p.issuers, 16_384, NOW);
        let (_, second) = cache.verify(&t, &p.issuers, 16_384, NOW);
        assert!(!Arc::ptr_eq(&first.unwrap(), &second.unwrap()));
    }
}
