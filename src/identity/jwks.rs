//! A JSON Web Key Set as stepgate uses it: public signing keys by `kid`, each with what it may verify.
//!
//! Parsing is deliberately forgiving of the set and strict about each key: one unusable key (an
//! encryption key, an unknown curve, a symmetric secret) is skipped with a note, so that an identity
//! provider adding a key type stepgate does not know cannot take every other key down with it.

use std::{collections::HashMap, fmt, sync::Arc};

use aws_lc_rs::signature::{self as lc, ParsedPublicKey, RsaPublicKeyComponents};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
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
    /// The key parsed once for its usual algorithm (RS256 for RSA unless the key states another,
    /// ES256/ES384 for EC), so that a verification does not rebuild it from `n`/`e` or `x`/`y`
    /// every time; other algorithms go through `key`.
    pub prepared: Option<Arc<PreparedKey>>,
    /// SHA-256 of the public key material: the same key across refreshes, a different one when a
    /// `kid` is reused for a new key.
    pub material: [u8; 32],
    /// SHA-256 of the material with what the key states about its use (`alg`, `issuer`): a
    /// token verified with it stays cached only while a key of the same binding is published
    /// under its `kid`, so a key republished for another issuer or algorithm ends the tokens it
    /// verified under the old terms.
    pub binding: [u8; 32],
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

/// A key parsed for one algorithm.
pub struct PreparedKey {
    pub alg: Algorithm,
    key: ParsedPublicKey,
}

impl PreparedKey {
    /// Checks a JWS signature (base64url) over `signed`: `Some(false)` for a wrong signature,
    /// `None` for a segment that is not base64url.
    pub fn verify(&self, signed: &[u8], signature_b64: &str) -> Option<bool> {
        let signature = URL_SAFE_NO_PAD.decode(signature_b64).ok()?;
        Some(self.key.verify_sig(signed, &signature).is_ok())
    }
}

fn prepare(kind: KeyKind, stated: Option<Algorithm>, jwk: &Value) -> Option<Arc<PreparedKey>> {
    let bytes = |name: &str| {
        jwk.get(name)
            .and_then(Value::as_str)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
    };
    let (alg, key) = match kind {
        KeyKind::Rsa => {
            let alg = stated.unwrap_or(Algorithm::RS256);
            let params = match alg {
                Algorithm::RS256 => &lc::RSA_PKCS1_2048_8192_SHA256,
                Algorithm::RS384 => &lc::RSA_PKCS1_2048_8192_SHA384,
                Algorithm::RS512 => &lc::RSA_PKCS1_2048_8192_SHA512,
                Algorithm::PS256 => &lc::RSA_PSS_2048_8192_SHA256,
                Algorithm::PS384 => &lc::RSA_PSS_2048_8192_SHA384,
                Algorithm::PS512 => &lc::RSA_PSS_2048_8192_SHA512,
                _ => return None,
            };
            let (n, e) = (bytes("n")?, bytes("e")?);
            let components = RsaPublicKeyComponents { n: &n, e: &e };
            (alg, components.to_parsed_public_key(params).ok()?)
        }
        KeyKind::EcP256 | KeyKind::EcP384 => {
            let (alg, params, len): (_, &'static dyn lc::VerificationAlgorithm, _) =
                if kind == KeyKind::EcP256 {
                    (Algorithm::ES256, &lc::ECDSA_P256_SHA256_FIXED, 32)
                } else {
                    (Algorithm::ES384, &lc::ECDSA_P384_SHA384_FIXED, 48)
                };
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != len || y.len() != len {
                return None;
            }
            // An uncompressed point: 0x04 || x || y.
            let point: Vec<u8> = [&[4u8][..], &x, &y].concat();
            (alg, ParsedPublicKey::new(params, point).ok()?)
        }
        KeyKind::Ed25519 => return None,
    };
    Some(Arc::new(PreparedKey { alg, key }))
}

/// The keys of one issuer at one moment. Immutable: a refresh builds a new set and swaps it in.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    /// Looked up for every token, a cached one's included: hashed with foldhash rather than
    /// SipHash (a third of the cost). The keys are the issuer's; a token's `kid` is only looked
    /// up, never inserted, so it cannot crowd a bucket.
    by_kid: HashMap<String, VerificationKey, foldhash::fast::RandomState>,
    /// Keys published without a `kid`; usable only by tokens without one.
    anonymous: Vec<VerificationKey>,
}

/// The size in bits of a big-endian modulus (leading zero bytes and bits not counted).
fn modulus_bits(n: &[u8]) -> usize {
    let n = &n[n.iter().take_while(|&&b| b == 0).count()..];
    match n.first() {
        None => 0,
        Some(first) => (n.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

/// At most this many notes of skipped keys per document (a 1 MiB document of `{}` entries would
/// otherwise log a third of a million lines per fetch).
const MAX_NOTES: usize = 16;

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
        // A `kid` published twice names two keys: which one a token means would be chance.
        let mut seen = std::collections::HashSet::new();
        let mut twice = std::collections::BTreeSet::new();
        for jwk in keys {
            if let Some(kid) = jwk.get("kid").and_then(Value::as_str)
                && !seen.insert(kid)
            {
                twice.insert(kid);
            }
        }
        for (i, jwk) in keys.iter().enumerate() {
            if let Some(kid) = jwk.get("kid").and_then(Value::as_str)
                && twice.contains(kid)
            {
                if notes.len() < MAX_NOTES {
                    notes.push(format!(
                        "keys[{i}] skipped: its kid is published more than once"
                    ));
                }
                continue;
            }
            match parse_key(jwk) {
                Ok(key) => set.insert(key),
                Err(_) if notes.len() >= MAX_NOTES => {}
                Err(why) => {
                    // A note may quote the document's values: kept short.
                    let why: String = why.chars().take(200).collect();
                    notes.push(format!("keys[{i}] skipped: {why}"));
                }
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

    /// Whether the set holds one of the bundled demo keys (`examples/demo-keys/jwks.json`), whose
    /// private halves are published with stepgate: whoever trusts one trusts tokens anyone can
    /// mint (`stepgate token`).
    pub fn has_demo_key(&self) -> bool {
        static DEMO: std::sync::LazyLock<Vec<[u8; 32]>> = std::sync::LazyLock::new(|| {
            let json = include_bytes!("../../examples/demo-keys/jwks.json");
            KeySet::parse(json).map_or_else(
                |_| Vec::new(),
                |(set, _)| set.keys().map(|key| key.material).collect(),
            )
        });
        self.keys().any(|key| DEMO.contains(&key.material))
    }

    fn keys(&self) -> impl Iterator<Item = &VerificationKey> {
        self.by_kid.values().chain(&self.anonymous)
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
    // RFC 7517 §4.2–4.3: a key published for something else (encryption, signing only) is not
    // a verification key, whichever of the two members says so.
    match jwk.get("use") {
        None => {}
        Some(Value::String(usage)) if usage == "sig" => {}
        Some(other) => return Err(format!("use is {other}, not \"sig\"")),
    }
    match jwk.get("key_ops") {
        None => {}
        Some(Value::Array(ops)) if ops.iter().any(|op| op == "verify") => {}
        Some(other) => return Err(format!("key_ops {other} does not include \"verify\"")),
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
    let prepared = prepare(kind, alg, jwk);
    // A key that parses but can never verify (an RSA key outside 2048–8192 bits, an EC point
    // off its curve or of the wrong length, an Ed25519 key not of 32 bytes) is no key: counted
    // as one, it would let a refresh replace a good set with one that verifies nothing.
    let usable = match kind {
        KeyKind::Ed25519 => field("x")
            .and_then(|x| URL_SAFE_NO_PAD.decode(x).ok())
            .is_some_and(|x| x.len() == 32),
        // aws-lc takes the modulus's size into account only when verifying.
        KeyKind::Rsa => {
            prepared.is_some()
                && field("n")
                    .and_then(|n| URL_SAFE_NO_PAD.decode(n).ok())
                    .is_some_and(|n| (2048..=8192).contains(&modulus_bits(&n)))
        }
        _ => prepared.is_some(),
    };
    if !usable {
        return Err(format!(
            "the {kty} key does not parse as a verification key (its size, or a point not on its curve)"
        ));
    }
    let mut material = Sha256::new();
    for part in ["kty", "crv", "n", "e", "x", "y"] {
        material.update(field(part).unwrap_or_default().as_bytes());
        material.update([0]);
    }
    let material: [u8; 32] = material.finalize().into();
    let issuer = field("issuer").map(str::to_owned);
    let mut binding = Sha256::new();
    binding.update(material);
    // Each optional part is marked present or absent, so that no issuer spells an absent `alg`.
    for part in [alg.map(|alg| format!("{alg:?}")), issuer.clone()] {
        match part {
            Some(text) => {
                binding.update([1]);
                binding.update(text.as_bytes());
                binding.update([0]);
            }
            None => binding.update([0]),
        }
    }
    Ok(VerificationKey {
        prepared,
        material,
        binding: binding.finalize().into(),
        kid: field("kid").map(str::to_owned),
        kind,
        alg,
        issuer,
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
    fn the_bundled_demo_keys_are_recognised_by_their_material_whatever_their_kid() {
        let demo = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/demo-keys/jwks.json"
        ))
        .unwrap();
        let (set, _) = KeySet::parse(&demo).unwrap();
        assert!(set.has_demo_key());
        let renamed = String::from_utf8(demo)
            .unwrap()
            .replace("stepgate-demo-", "production-");
        let (set, _) = KeySet::parse(renamed.as_bytes()).unwrap();
        assert!(set.has_demo_key(), "a demo key under another kid");
        let other = format!(r#"{{"keys":[{}]}}"#, rsa("stepgate-demo-rsa-1", ""));
        let (set, _) = KeySet::parse(other.as_bytes()).unwrap();
        assert!(!set.has_demo_key(), "another key under a demo kid");
    }

    /// Signs `message` with a demo key, as a JWS signature segment.
    fn demo_signature(alg: Algorithm, message: &str) -> String {
        let (file, key) = match alg {
            Algorithm::RS256 => ("demo-rsa-private.pem", "rsa"),
            _ => ("demo-ec-private.pem", "ec"),
        };
        let pem = std::fs::read(
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo-keys/").to_owned() + file,
        )
        .unwrap();
        let key = if key == "rsa" {
            jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()
        } else {
            jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap()
        };
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg).unwrap()
    }

    #[test]
    fn published_keys_are_parsed_once_and_verify_like_jsonwebtoken() {
        let jwks = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/demo-keys/jwks.json"
        ))
        .unwrap();
        let (set, _) = KeySet::parse(&jwks).unwrap();
        for (kid, alg) in [
            ("stepgate-demo-rsa-1", Algorithm::RS256),
            ("stepgate-demo-ec-1", Algorithm::ES256),
        ] {
            let key = set.find(Some(kid)).unwrap();
            let prepared = key.prepared.as_deref().expect("prepared");
            assert_eq!(prepared.alg, alg);
            let good = demo_signature(alg, "header.payload");
            let mut bad = good.clone();
            let last = bad.pop().unwrap();
            bad.push(if last == 'A' { 'B' } else { 'A' });
            for (message, signature) in [
                ("header.payload", good.as_str()),
                ("header.payloaX", good.as_str()),
                ("header.payload", bad.as_str()),
            ] {
                let ours = prepared.verify(message.as_bytes(), signature);
                let theirs =
                    jsonwebtoken::crypto::verify(signature, message.as_bytes(), &key.key, alg);
                assert_eq!(ours, theirs.ok(), "{kid} {message} {signature}");
            }
            assert!(prepared.verify(b"header.payload", &good).unwrap());
            assert!(prepared.verify(b"header.payload", "not base64!").is_none());
        }
    }

    #[test]
    fn a_key_stating_another_rsa_algorithm_is_prepared_for_it() {
        let doc = format!(r#"{{"keys":[{}]}}"#, rsa("ps", r#","alg":"PS384""#));
        let (set, _) = KeySet::parse(doc.as_bytes()).unwrap();
        let prepared = set.find(Some("ps")).unwrap().prepared.as_deref().unwrap();
        assert_eq!(prepared.alg, Algorithm::PS384);
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

    /// A key that parses but could never verify is no key: a refresh of such keys alone leaves
    /// no usable key, and so never replaces a good set (`keys::load` keeps the last good one).
    #[test]
    fn keys_that_could_never_verify_are_skipped() {
        let small_rsa = r#"{"kty":"RSA","kid":"small","n":"0Z2gYbtDMjnyQgE6Ksz6j_rhfyjvp9JS6ZOtWMaVBFnl8hHHF3ZyrmXi8xHrzXwS3zQ6-IwpqNfk3ClP9vUSAQ","e":"AQAB"}"#;
        let off_curve = r#"{"kty":"EC","crv":"P-256","kid":"zero","x":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","y":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#;
        let short_ec = r#"{"kty":"EC","crv":"P-256","kid":"short","x":"AAAA","y":"AAAA"}"#;
        let short_ed = r#"{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"AAAA"}"#;
        let doc = format!(r#"{{"keys":[{small_rsa},{off_curve},{short_ec},{short_ed}]}}"#);
        let (set, notes) = KeySet::parse(doc.as_bytes()).unwrap();
        assert!(set.is_empty(), "{set:?}");
        assert_eq!(notes.len(), 4, "{notes:?}");
        let good = format!(r#"{{"keys":[{small_rsa},{}]}}"#, rsa("good", ""));
        let (set, _) = KeySet::parse(good.as_bytes()).unwrap();
        assert!(set.find(Some("good")).is_some() && set.find(Some("small")).is_none());
    }

    /// A `kid` published twice names two keys: neither is taken (which one a token means would
    /// be chance), and the other keys are.
    #[test]
    fn a_kid_published_twice_is_skipped() {
        let doc = format!(
            r#"{{"keys":[{},{},{}]}}"#,
            rsa("twice", ""),
            rsa("twice", r#","alg":"RS384""#),
            rsa("once", "")
        );
        let (set, notes) = KeySet::parse(doc.as_bytes()).unwrap();
        assert!(set.find(Some("twice")).is_none());
        assert!(set.find(Some("once")).is_some());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("more than once"), "{notes:?}");
    }

    /// A document of many unusable entries makes a bounded number of short notes.
    #[test]
    fn notes_of_skipped_keys_are_bounded() {
        let long = "x".repeat(10_000);
        let entries: Vec<String> = (0..1000)
            .map(|i| format!(r#"{{"kty":"RSA","kid":"k{i}","use":"{long}"}}"#))
            .collect();
        let doc = format!(r#"{{"keys":[{}]}}"#, entries.join(","));
        let (set, notes) = KeySet::parse(doc.as_bytes()).unwrap();
        assert!(set.is_empty());
        assert_eq!(notes.len(), MAX_NOTES);
        assert!(notes.iter().all(|n| n.len() < 300), "{}", notes[0].len());
    }

    #[test]
    fn use_and_key_ops_are_honoured_when_present() {
        let doc = format!(
            r#"{{"keys":[{},{},{},{},{},{},{}]}}"#,
            rsa("sig", r#","use":"sig""#),
            rsa("verify", r#","key_ops":["verify"]"#),
            rsa("both", r#","use":"sig","key_ops":["sign","verify"]"#),
            rsa("sign-only", r#","key_ops":["sign"]"#),
            rsa("encrypt", r#","key_ops":["encrypt","wrapKey"]"#),
            rsa("ops-not-a-list", r#","key_ops":"verify""#),
            rsa("use-not-a-string", r#","use":["sig"]"#),
        );
        let (set, notes) = KeySet::parse(doc.as_bytes()).unwrap();
        let mut kids: Vec<&str> = set.kids().collect();
        kids.sort_unstable();
        assert_eq!(kids, ["both", "sig", "verify"]);
        assert_eq!(notes.len(), 4, "{notes:?}");
    }

    #[test]
    fn rejects_documents_that_are_not_key_sets() {
        assert!(KeySet::parse(b"not json").is_err());
        assert!(KeySet::parse(b"{\"kees\":[]}").is_err());
        assert!(KeySet::parse(b"{\"keys\":[]}").unwrap().0.is_empty());
    }
}
