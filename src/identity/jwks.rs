//! A JSON Web Key Set as stepgate uses it: public signing keys by `kid`, each with what it may verify.
//!
//! Parsing is deliberately forgiving of the set and strict about each key: one unusable key (an
//! encryption key, an unknown curve, a symmetric secret) is skipped with a note, so that an identity
//! provider adding a key type stepgate does not know cannot take every other key down with it.

use std::{collections::HashMap, fmt};

use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Which algorithms a key can verify, from its `kty` (and `crv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Whether a token signed with `alg` can be verified by a key of this kind.
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            Self::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Self::EcP256 => alg == ES256,
            Self::EcP384 => alg == ES384,
            Self::Ed25519 => alg == EdDSA,
        }
    }
}

/// One verification key.
#[derive(Clone)]
pub struct VerificationKey {
    pub kid: Option<String>,
    pub kind: KeyKind,
    /// The key's own `alg`, when the set states one: the token's header must then name the same.
    pub alg: Option<Algorithm>,
    /// Entra publishes an `issuer` per key; a key that states one only verifies that issuer's tokens.
    pub issuer: Option<String>,
    pub key: DecodingKey,
    /// SHA-256 of the public key material: the same key across refreshes, a different one when a
    /// `kid` is reused for a new key.
    pub material: [u8; 32],
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .field("alg", &self.alg)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// The keys of one issuer at one moment. Immutable: a refresh builds a new set and swaps it in.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    by_kid: HashMap<String, VerificationKey>,
    /// Keys published without a `kid`; usable only by tokens without one.
    anonymous: Vec<VerificationKey>,
}

/// Why a JWKS document could not be used at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JwksError(pub String);

impl KeySet {
    /// Parses a JWKS document. Returns the usable keys and one note per skipped key.
    pub fn parse(json: &[u8]) -> Result<(KeySet, Vec<String>), JwksError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| JwksError(format!("not valid JSON: {e}")))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| JwksError("no \"keys\" array".to_owned()))?;
        let mut set = KeySet::default();
        let mut notes = Vec::new();
        for (i, jwk) in keys.iter().enumerate() {
            match parse_key(jwk) {
                Ok(key) => set.insert(key),
                Err(why) => notes.push(format!("keys[{i}] skipped: {why}")),
            }
        }
        Ok((set, notes))
    }

    fn insert(&mut self, key: VerificationKey) {
        match &key.kid {
            Some(kid) => {
                self.by_kid.insert(kid.clone(), key);
            }
            None => self.anonymous.push(key),
        }
    }

    pub fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.by_kid.keys().map(String::as_str)
    }

    /// The key for a token header's `kid`. Without a `kid`, only an unambiguous key qualifies: the
    /// single key of the set, or the single key without a `kid`.
    pub fn find(&self, kid: Option<&str>) -> Option<&VerificationKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None if self.anonymous.len() == 1 => self.anonymous.first(),
            None if self.anonymous.is_empty() && self.by_kid.len() == 1 => {
                self.by_kid.values().next()
            }
            None => None,
        }
    }
}

fn parse_key(jwk: &Value) -> Result<VerificationKey, String> {
    let field = |name: &str| jwk.get(name).and_then(Value::as_str);
    if let Some(usage) = field("use")
        && usage != "sig"
    {
        return Err(format!("use is {usage:?}, not \"sig\""));
    }
    let kty = field("kty").ok_or("no kty")?;
    let (kind, key) = match kty {
        "RSA" => {
            let (n, e) = (field("n").ok_or("no n")?, field("e").ok_or("no e")?);
            let key = DecodingKey::from_rsa_components(n, e).map_err(|e| e.to_string())?;
            (KeyKind::Rsa, key)
        }
        "EC" => {
            let kind = match field("crv") {
                Some("P-256") => KeyKind::EcP256,
                Some("P-384") => KeyKind::EcP384,
                other => return Err(format!("unsupported EC curve {other:?}")),
            };
            let (x, y) = (field("x").ok_or("no x")?, field("y").ok_or("no y")?);
            let key = DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?;
            (kind, key)
        }
        "OKP" => {
            if field("crv") != Some("Ed25519") {
                return Err(format!("unsupported OKP curve {:?}", field("crv")));
            }
            let key = DecodingKey::from_ed_components(field("x").ok_or("no x")?)
                .map_err(|e| e.to_string())?;
            (KeyKind::Ed25519, key)
        }
        "oct" => return Err("symmetric keys are never used".to_owned()),
        other => return Err(format!("unsupported kty {other:?}")),
    };
    let alg = match field("alg") {
        None => None,
        Some(name) => {
            let alg: Algorithm = name
                .parse()
                .map_err(|_| format!("unsupported alg {name:?}"))?;
            if !kind.fits(alg) {
                return Err(format!("alg {name} does not fit kty {kty}"));
            }
            Some(alg)
        }
    };
    let mut material = Sha256::new();
    for part in ["kty", "crv", "n", "e", "x", "y"] {
        material.update(field(part).unwrap_or_default().as_bytes());
        material.update([0]);
    }
    Ok(VerificationKey {
        material: material.finalize().into(),
        kid: field("kid").map(str::to_owned),
        kind,
        alg,
        issuer: field("issuer").map(str::to_owned),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_N: &str = "u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw";

    fn rsa(kid: &str, extra: &str) -> String {
        format!(r#"{{"kty":"RSA","kid":"{kid}","n":"{RSA_N}","e":"AQAB"{extra}}}"#)
    }

    #[test]
    fn finds_keys_by_kid() {
        let doc = format!(
            r#"{{"keys":[{},{}]}}"#,
            rsa("a", ""),
            rsa("b", r#","alg":"RS256""#)
        );
        let (set, notes) = KeySet::parse(doc.as_bytes()).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(set.len(), 2);
        assert_eq!(set.find(Some("b")).unwrap().alg, Some(Algorithm::RS256));
        assert!(set.find(Some("c")).is_none());
        assert!(
            set.find(None).is_none(),
            "two keys: a token without kid is ambiguous"
        );
    }

    #[test]
    fn skips_unusable_keys_and_keeps_the_rest() {
        let doc = format!(
            r#"{{"keys":[{},{},{},{{"kty":"oct","k":"c2VjcmV0"}},{}]}}"#,
            rsa("enc", r#","use":"enc""#),
            rsa("mismatch", r#","alg":"ES256""#),
            r#"{"kty":"EC","crv":"P-521","x":"AA","y":"AA"}"#,
            rsa("good", "")
        );
        let (set, notes) = KeySet::parse(doc.as_bytes()).unwrap();
        assert_eq!(set.kids().collect::<Vec<_>>(), vec!["good"]);
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert_eq!(set.find(None).unwrap().kid.as_deref(), Some("good"));
    }

    #[test]
    fn rejects_documents_that_are_not_key_sets() {
        assert!(KeySet::parse(b"not json").is_err());
        assert!(KeySet::parse(b"{\"kees\":[]}").is_err());
        assert!(KeySet::parse(b"{\"keys\":[]}").unwrap().0.is_empty());
    }
}
