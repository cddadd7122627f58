//! JWT access-token verification: structure, header hygiene, issuer, key, signature, time, audience.
//!
//! stepgate parses the compact JWS itself (in one pass, see [`super::segments`]) and asks aws-lc
//! only to check the signature. That keeps every refusal distinguishable (an expired token is not
//! a bad signature), lets `now` be passed in, and makes a claim of the wrong JSON type an answer
//! rather than a panic.
//! Order matters: nothing in a token's payload is trusted before its signature is verified, except
//! `iss`, which only selects whose keys to try.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use super::{
    claims::{Principal, read_principal, str_list},
    intern::Interner,
    issuer::{Issuer, Issuers, Tenants},
    segments::{self, Claims, Confirmation, Raw},
};

/// A token whose signature, issuer, audience and lifetime were checked.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub issuer: Arc<Issuer>,
    /// The header's `kid` and the binding (material, `alg`, `issuer`) of the key that verified
    /// the signature: the verified-token cache serves the token only while that key is still
    /// published on the same terms.
    pub kid: Option<Arc<str>>,
    pub key_binding: [u8; 32],
    /// Meant for the admin API alone (its audiences are all `admin.audiences`): `Check` and
    /// `Decide` refuse it, so that an operator's admin token is no API token.
    pub admin_only: bool,
    pub principal: Arc<Principal>,
    /// Client capabilities (`xms_cc`), lower-cased.
    pub client_capabilities: Arc<[Arc<str>]>,
    /// The claims the policy reads beyond the principal (claim requirements, `claim:` identity
    /// headers, CEL conditions), as selected by [`KeepClaims`]; empty when it reads none.
    pub claims: Map<String, Value>,
    /// The SHA-256 the token's fingerprint is taken from when it is not the token's own. An
    /// ECDSA signature `(r, s)` has a twin, `(r, n − s)`, that verifies as well: anyone holding
    /// the token can spell it a second way. A token signed with the upper `s` is named by its
    /// twin with the lower one, so both spellings share one fingerprint, and a block of it or a
    /// risk count keyed by it holds for both. `None`: the token's own SHA-256.
    pub fingerprint_digest: Option<[u8; 32]>,
    /// The client certificate the token is bound to (`cnf.x5t#S256`, RFC 8705): the request must
    /// present it. `None` for a bearer token, and for any token of an issuer with
    /// `accept_bound_tokens` (the proxy in front checks the binding).
    /// Boxed: most tokens are bearer tokens, and a cached token's size counts.
    pub certificate_binding: Option<Box<super::Thumbprint>>,
}

/// Which raw claims a verified token keeps. A parsed claim map costs 2–4 KiB per token (most of a
/// cached token's memory), and most policies read a few named claims or none beyond the principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepClaims {
    /// Every claim: a CEL condition reads `claims` (and may read any of them).
    All,
    /// Only these claims (possibly none).
    Named(Box<[String]>),
}

impl KeepClaims {
    pub fn wants(&self, claim: &str) -> bool {
        match self {
            KeepClaims::All => true,
            KeepClaims::Named(names) => names.iter().any(|name| name == claim),
        }
    }
}

impl VerifiedToken {
    /// Entra: the client declared it can handle claims challenges (`xms_cc` ∋ `cp1`).
    pub fn client_is_challenge_capable(&self) -> bool {
        self.client_capabilities.iter().any(|c| &**c == "cp1")
    }
}

/// Why a token was refused. Every variant is an `invalid_token` (401) answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the access token is malformed: {0}")]
    Malformed(&'static str),
    #[error("the access token header carries {0:?}, which is never accepted")]
    ForbiddenHeader(String),
    #[error(
        "the access token carries a nonce header and cannot be verified (a Microsoft Graph token?)"
    )]
    Unverifiable,
    /// The `alg` as the header names it (at most 16 characters of one that names no algorithm),
    /// shown quoted and escaped: it is the caller's text, and the message is logged.
    #[error("the access token algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(String),
    #[error("the access token issuer is not trusted")]
    IssuerUnknown,
    #[error("the access token signing key is unknown")]
    UnknownKey {
        /// Id of the issuer whose keys lack it, and the token's `kid`: enough to fetch again.
        issuer: String,
        kid: Option<String>,
    },
    #[error("the access token tenant does not match its issuer")]
    TenantMismatch,
    #[error("the access token tenant is not allowed")]
    TenantNotAllowed,
    #[error("the access token signing key does not fit its algorithm")]
    KeyMismatch,
    #[error("the access token signature is invalid")]
    SignatureInvalid,
    #[error("the access token expired")]
    Expired,
    #[error("the access token is not valid yet")]
    NotYetValid,
    #[error("the access token is not meant for this audience")]
    AudienceMismatch,
    #[error("the access token claim {0:?} is missing, of the wrong type or out of range")]
    ClaimInvalid(&'static str),
    #[error("the token type {0:?} is not an access token")]
    WrongType(String),
    #[error(
        "the token carries nonce, at_hash or c_hash, or a payload typ of another kind of token: an ID token is not an access token"
    )]
    IdToken,
    #[error(
        "the access token is bound to a key (cnf) by a proof stepgate does not check, such as DPoP: only a client certificate's x5t#S256 is checked"
    )]
    Bound,
}

/// The longest header `kid` read; a longer one is a malformed token.
pub const MAX_KID_BYTES: usize = 256;

/// Verifies `token` against the configured issuers at unix time `now`.
pub fn verify(
    token: &str,
    issuers: &Issuers,
    max_bytes: usize,
    now: i64,
    keep: &KeepClaims,
    interner: &Interner,
) -> Result<VerifiedToken, TokenError> {
    if token.len() > max_bytes {
        return Err(TokenError::TooLarge {
            len: token.len(),
            max: max_bytes,
        });
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated segments",
        ));
    };
    if signature_b64.is_empty() {
        return Err(TokenError::Malformed("the signature segment is empty"));
    }
    let header_bytes =
        decode_segment(header_b64).ok_or(TokenError::Malformed("bad header segment"))?;
    let header =
        segments::header(&header_bytes).ok_or(TokenError::Malformed("bad header segment"))?;
    let alg_name = header
        .alg
        .as_ref()
        .and_then(Raw::as_str)
        .ok_or(TokenError::Malformed("the header has no alg"))?;
    // A key the token names itself (`jku`, `x5u`, `jwk`) would let it pick its own verifier; a
    // `crit` naming anything is refused (RFC 7515 §4.1.11: a recipient must reject extensions it
    // does not understand, and stepgate understands none).
    for (present, name) in [
        (header.jku, "jku"),
        (header.x5u, "x5u"),
        (header.jwk, "jwk"),
    ] {
        if present {
            return Err(TokenError::ForbiddenHeader(name.to_owned()));
        }
    }
    if header.crit {
        return Err(TokenError::ForbiddenHeader("crit".to_owned()));
    }
    if header.nonce {
        return Err(TokenError::Unverifiable);
    }
    check_type(header.typ.as_ref())?;
    let alg: Algorithm = alg_name
        .parse()
        .map_err(|_| TokenError::AlgorithmNotAllowed(alg_name.chars().take(16).collect()))?;
    let kid = match &header.kid {
        None => None,
        // A key id names a key the identity provider publishes: short in practice (Entra's
        // are 27 characters, a thumbprint 43). A long one is refused before it can be looked
        // up, or remembered as unknown (MAX_KID_BYTES × 4096 entries per issuer at most).
        Some(Raw::Str(kid)) if kid.len() > MAX_KID_BYTES => {
            return Err(TokenError::Malformed(
                "the header kid is longer than 256 bytes",
            ));
        }
        Some(Raw::Str(kid)) => Some(&**kid),
        Some(_) => return Err(TokenError::Malformed("the header kid is not a string")),
    };

    let payload_bytes =
        decode_segment(payload_b64).ok_or(TokenError::Malformed("bad payload segment"))?;
    let claims = segments::claims(&payload_bytes, keep)
        .ok_or(TokenError::Malformed("bad payload segment"))?;
    let iss = claims
        .iss
        .as_ref()
        .and_then(Raw::as_str)
        .ok_or(TokenError::IssuerUnknown)?;
    let (issuer, iss_tenant) = issuers.by_iss(iss).ok_or(TokenError::IssuerUnknown)?;
    if !issuer.algorithms.contains(&alg) {
        return Err(TokenError::AlgorithmNotAllowed(alg_name.to_owned()));
    }

    let keys = issuer.keys();
    let key = keys.find(kid).ok_or_else(|| TokenError::UnknownKey {
        issuer: issuer.id.to_string(),
        kid: kid.map(str::to_owned),
    })?;
    if !key.kind.fits(alg) || key.alg.is_some_and(|key_alg| key_alg != alg) {
        return Err(TokenError::KeyMismatch);
    }
    // Entra publishes an `issuer` per key: a key only verifies tokens of that issuer. Its
    // `{tenantid}` template (every key of the shared key sets, which single-tenant discovery
    // documents name too) takes the token's tenant: the one in `iss` for a template issuer, the
    // token's `tid` (a GUID) for an exact one, as Microsoft's validation does.
    if let Some(key_iss) = key.issuer.as_deref() {
        const PLACEHOLDER: &str = super::issuer::IssuerName::TENANT_PLACEHOLDER;
        let expected = if key_iss.contains(PLACEHOLDER) {
            let tenant = match (&iss_tenant, &claims.tid) {
                (Some(tenant), _) => tenant.as_str(),
                (None, Some(Raw::Str(tid))) if super::issuer::is_guid(tid) => tid,
                (None, _) => return Err(TokenError::KeyMismatch),
            };
            key_iss.replace(PLACEHOLDER, tenant)
        } else {
            key_iss.to_owned()
        };
        if !expected.eq_ignore_ascii_case(iss) {
            return Err(TokenError::KeyMismatch);
        }
    }
    let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
    let checked = match key.prepared.as_deref().filter(|p| p.alg == alg) {
        Some(prepared) => prepared.verify(signed.as_bytes(), signature_b64),
        None => jsonwebtoken::crypto::verify(signature_b64, signed.as_bytes(), &key.key, alg).ok(),
    };
    match checked {
        Some(true) => {}
        Some(false) => return Err(TokenError::SignatureInvalid),
        None => return Err(TokenError::Malformed("bad signature segment")),
    }
    let fingerprint_digest =
        lower_s_twin(alg, signed, signature_b64).map(|twin| Sha256::digest(twin.as_bytes()).into());

    check_tenant(issuer, iss_tenant.as_deref(), &claims)?;
    check_lifetime(&claims, issuer.leeway as i64, now)?;
    check_audience(&claims, &issuer.audiences)?;
    let admin_only = admin_only(&claims, issuer);
    // Keycloak types each token it signs in the payload: `Bearer` for an access token, `ID`,
    // `Logout`, `Refresh` and `Offline` for the others.
    let id_typ = matches!(&claims.typ, Some(Raw::Str(typ))
        if ["ID", "Logout", "Refresh", "Offline"].iter().any(|t| typ.eq_ignore_ascii_case(t)));
    if (claims.id_token_members || id_typ) && issuer.refuse_id_tokens {
        return Err(TokenError::IdToken);
    }
    // A token bound to its holder's key (RFC 9449 §7.1, RFC 8705 §3): its binding is what makes
    // a stolen copy useless. A client certificate's is checked on each request (the engine); any
    // other proof stepgate does not check, so such a token is refused.
    let certificate_binding = match claims.confirmation {
        _ if issuer.accept_bound_tokens => None,
        None => None,
        Some(Confirmation::Certificate(thumbprint)) => Some(Box::new(thumbprint)),
        Some(Confirmation::Unverifiable) => return Err(TokenError::Bound),
        Some(Confirmation::Malformed) => return Err(TokenError::ClaimInvalid("cnf")),
    };
    if issuer.require_at_jwt && !is_at_jwt(header.typ.as_ref()) {
        return Err(TokenError::WrongType(
            header
                .typ
                .as_ref()
                .and_then(Raw::as_str)
                .unwrap_or("none")
                .chars()
                .take(32)
                .collect(),
        ));
    }
    // One lock for all the values this token shares with others.
    let mut shared = interner.lock();
    let mut principal = read_principal(issuer, &claims, &mut shared)?;
    if principal
        .auth_time
        .is_some_and(|t| t > now.saturating_add(issuer.leeway as i64))
    {
        return Err(TokenError::ClaimInvalid("auth_time"));
    }
    let client_capabilities: Vec<String> = str_list(claims.xms_cc.as_ref())
        .ok_or(TokenError::ClaimInvalid("xms_cc"))?
        .into_iter()
        .map(|c| c.to_ascii_lowercase())
        .collect();
    principal.claims_challenge_capable = client_capabilities.iter().any(|c| c == "cp1");
    Ok(VerifiedToken {
        issuer: Arc::clone(issuer),
        kid: kid.map(|kid| shared.string(kid)),
        key_binding: key.binding,
        admin_only,
        principal: Arc::new(principal),
        client_capabilities: shared.list(client_capabilities.iter().map(String::as_str)),
        claims: claims.kept,
        fingerprint_digest,
        certificate_binding,
    })
}

/// The orders of the curves of ES256 (P-256) and ES384 (P-384), big-endian (SEC 2, FIPS 186-4).
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];
const P384_ORDER: [u8; 48] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc7, 0x63, 0x4d, 0x81, 0xf4, 0x37, 0x2d, 0xdf,
    0x58, 0x1a, 0x0d, 0xb2, 0x48, 0xb0, 0xa7, 0x7a, 0xec, 0xec, 0x19, 0x6a, 0xcc, 0xc5, 0x29, 0x73,
];

/// For an ECDSA token (`signed` its header and payload) whose signature's `s` is in the upper
/// half of the curve order `n`, the same token with `s` replaced by `n − s`: the other spelling
/// that verifies. `None` for other algorithms and for a lower `s` (the token is its own twin).
/// Called on verified tokens only, so the signature has its curve's length and `0 < s < n`.
pub(super) fn lower_s_twin(alg: Algorithm, signed: &str, signature_b64: &str) -> Option<String> {
    let order: &[u8] = match alg {
        Algorithm::ES256 => &P256_ORDER,
        Algorithm::ES384 => &P384_ORDER,
        _ => return None,
    };
    let mut signature = decode_segment(signature_b64)?;
    if signature.len() != 2 * order.len() {
        return None;
    }
    let s = &mut signature[order.len()..];
    if !upper_half(s, order) {
        return None;
    }
    subtract_from(order, s);
    Some(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&signature)))
}

/// Whether big-endian `s` is more than `n / 2` (`2s > n`; `n` is odd), for `s` and `n` of one
/// length.
fn upper_half(s: &[u8], n: &[u8]) -> bool {
    // n / 2 rounded down, big-endian: each byte shifted right, the bit above carried in.
    let mut carry = 0u8;
    let half: Vec<u8> = n
        .iter()
        .map(|byte| {
            let shifted = (byte >> 1) | (carry << 7);
            carry = byte & 1;
            shifted
        })
        .collect();
    s > &half[..]
}

/// `s = n − s` for big-endian `s ≤ n` of one length.
fn subtract_from(n: &[u8], s: &mut [u8]) {
    let mut borrow = 0u16;
    for (digit, minuend) in s.iter_mut().rev().zip(n.iter().rev()) {
        let subtrahend = u16::from(*digit) + borrow;
        let minuend = u16::from(*minuend);
        borrow = u16::from(minuend < subtrahend);
        *digit = (minuend + (borrow << 8) - subtrahend) as u8;
    }
}

/// `typ` is optional; when present it must name a JWT access token (`JWT`, or RFC 9068's
/// `at+jwt`, as a media type and case-insensitively). Logout tokens, DPoP proofs, SETs and other
/// JWTs signed by the same keys are refused.
fn check_type(typ: Option<&Raw>) -> Result<(), TokenError> {
    let Some(typ) = typ else { return Ok(()) };
    let name = typ
        .as_str()
        .ok_or(TokenError::Malformed("the header typ is not a string"))?;
    let lower = name.to_ascii_lowercase();
    match lower.strip_prefix("application/").unwrap_or(&lower) {
        "jwt" | "at+jwt" => Ok(()),
        _ => Err(TokenError::WrongType(name.chars().take(32).collect())),
    }
}

/// Whether `typ` is RFC 9068's `at+jwt` (as a media type too, in any case).
fn is_at_jwt(typ: Option<&Raw>) -> bool {
    typ.and_then(Raw::as_str).is_some_and(|name| {
        let lower = name.to_ascii_lowercase();
        lower.strip_prefix("application/").unwrap_or(&lower) == "at+jwt"
    })
}

/// base64url without padding (RFC 7515 §2), canonical: no `=`, no whitespace, no stray bits in
/// the last character. A token that decodes only leniently is spelled in a way no issuer writes.
fn decode_segment(segment: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(segment).ok()
}

/// The latest NumericDate accepted, 9999-12-31T23:59:59Z: any later value (and any before 1970)
/// is not a time an identity provider issues, and only invites arithmetic overflow downstream.
pub const MAX_NUMERIC_DATE: i64 = 253_402_300_799;

/// A NumericDate (RFC 7519 §2): a JSON number of seconds since 1970, possibly with a fraction,
/// within `0..=MAX_NUMERIC_DATE`.
pub(super) fn numeric_date(
    value: Option<&Raw>,
    name: &'static str,
) -> Result<Option<i64>, TokenError> {
    let seconds = match value {
        None | Some(Raw::Null) => return Ok(None),
        Some(Raw::Num(n)) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| (0.0..=MAX_NUMERIC_DATE as f64).contains(f))
                .map(|f| f.floor() as i64)
        }),
        Some(_) => None,
    };
    seconds
        .filter(|s| (0..=MAX_NUMERIC_DATE).contains(s))
        .map(Some)
        .ok_or(TokenError::ClaimInvalid(name))
}

/// Multi-tenant issuers: the tenant in `iss` must be the token's `tid`, and an allowed one.
fn check_tenant(
    issuer: &Issuer,
    iss_tenant: Option<&str>,
    claims: &Claims,
) -> Result<(), TokenError> {
    let Some(tenant) = iss_tenant else {
        return Ok(());
    };
    let tid = match &claims.tid {
        Some(Raw::Str(tid)) => tid,
        Some(_) => return Err(TokenError::ClaimInvalid("tid")),
        None => return Err(TokenError::TenantMismatch),
    };
    if !super::issuer::is_guid(tid) || !tid.eq_ignore_ascii_case(tenant) {
        return Err(TokenError::TenantMismatch);
    }
    match &issuer.tenants {
        Tenants::Only(allowed) if !allowed.contains(tenant) => Err(TokenError::TenantNotAllowed),
        _ => Ok(()),
    }
}

fn check_lifetime(claims: &Claims, leeway: i64, now: i64) -> Result<(), TokenError> {
    let exp = numeric_date(claims.exp.as_ref(), "exp")?.ok_or(TokenError::ClaimInvalid("exp"))?;
    if now > exp.saturating_add(leeway) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = numeric_date(claims.nbf.as_ref(), "nbf")?
        && now < nbf.saturating_sub(leeway)
    {
        return Err(TokenError::NotYetValid);
    }
    Ok(())
}

/// Whether the token is meant for the admin API alone: every audience of it the issuer accepts
/// is one of `admin.audiences`.
fn admin_only(claims: &Claims, issuer: &Issuer) -> bool {
    if issuer.admin_audiences.is_empty() {
        return false;
    }
    let for_data_plane = |aud: &str| {
        issuer.audiences.iter().any(|a| a == aud)
            && !issuer.admin_audiences.iter().any(|a| a == aud)
    };
    match &claims.aud {
        Some(Raw::Str(aud)) => !for_data_plane(aud),
        Some(Raw::StrList(list)) => !list.iter().any(|aud| for_data_plane(aud)),
        _ => false,
    }
}

fn check_audience(claims: &Claims, audiences: &[String]) -> Result<(), TokenError> {
    let accepted = |aud: &str| audiences.iter().any(|a| a == aud);
    match &claims.aud {
        Some(Raw::Str(aud)) if accepted(aud) => Ok(()),
        Some(Raw::StrList(list)) if list.iter().any(|aud| accepted(aud)) => Ok(()),
        Some(Raw::Str(_) | Raw::StrList(_)) | None => Err(TokenError::AudienceMismatch),
        Some(_) => Err(TokenError::ClaimInvalid("aud")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `a + b` of big-endian numbers of one length, with the carry out of the top byte.
    fn add(a: &[u8], b: &[u8]) -> (Vec<u8>, bool) {
        let mut sum = vec![0; a.len()];
        let mut carry = 0u16;
        for i in (0..a.len()).rev() {
            let total = u16::from(a[i]) + u16::from(b[i]) + carry;
            sum[i] = total as u8;
            carry = total >> 8;
        }
        (sum, carry == 1)
    }

    proptest::proptest! {
        #[test]
        fn the_twin_of_an_upper_s_adds_up_to_the_order(
            s in proptest::collection::vec(proptest::prelude::any::<u8>(), 48),
        ) {
            for order in [&P256_ORDER[..], &P384_ORDER[..]] {
                let s = &s[..order.len()];
                proptest::prop_assume!(s < order);
                // 2s > n, with 2s written out (and its carry).
                let (double, over) = add(s, s);
                proptest::prop_assert_eq!(upper_half(s, order), over || &double[..] > order);
                let mut twin = s.to_vec();
                subtract_from(order, &mut twin);
                proptest::prop_assert_eq!(add(&twin, s), (order.to_vec(), false));
            }
        }
    }

    /// The twin of an upper-`s` signature verifies where the original does, by aws-lc's own
    /// reading of both curves (a wrong curve order would make it fail).
    #[test]
    fn the_twin_of_a_real_signature_verifies_on_both_curves() {
        use aws_lc_rs::{
            rand::SystemRandom,
            signature::{self, EcdsaKeyPair, KeyPair as _},
        };
        let rng = SystemRandom::new();
        for (signing, verifying, alg) in [
            (
                &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &signature::ECDSA_P256_SHA256_FIXED,
                Algorithm::ES256,
            ),
            (
                &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                &signature::ECDSA_P384_SHA384_FIXED,
                Algorithm::ES384,
            ),
        ] {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
            let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref()).unwrap();
            let public = signature::UnparsedPublicKey::new(verifying, pair.public_key().as_ref());
            let (mut upper, mut lower) = (0, 0);
            while upper < 3 || lower < 3 {
                let signed = pair.sign(&rng, b"h.p").unwrap();
                let encoded = URL_SAFE_NO_PAD.encode(signed.as_ref());
                let Some(twin) = lower_s_twin(alg, "h.p", &encoded) else {
                    lower += 1;
                    continue;
                };
                upper += 1;
                let twin = URL_SAFE_NO_PAD
                    .decode(twin.strip_prefix("h.p.").unwrap())
                    .unwrap();
                assert_ne!(twin, signed.as_ref());
                assert_eq!(
                    twin[..twin.len() / 2],
                    signed.as_ref()[..twin.len() / 2],
                    "same r"
                );
                public.verify(b"h.p", &twin).expect("the twin verifies");
                assert_eq!(
                    lower_s_twin(alg, "h.p", &URL_SAFE_NO_PAD.encode(&twin)),
                    None,
                    "the twin has the lower s"
                );
            }
        }
    }

    #[test]
    fn only_an_upper_s_of_an_ecdsa_signature_has_a_twin() {
        let signature = |s: &[u8]| URL_SAFE_NO_PAD.encode([&[7u8; 32][..], s].concat());
        let mut high = P256_ORDER;
        high[31] -= 1; // n − 1
        let twin = lower_s_twin(Algorithm::ES256, "h.p", &signature(&high)).expect("a twin");
        let mut one = [0u8; 32];
        one[31] = 1;
        assert_eq!(twin, format!("h.p.{}", signature(&one)), "n − (n − 1) = 1");
        assert_eq!(
            lower_s_twin(Algorithm::ES256, "h.p", &signature(&one)),
            None
        );
        assert_eq!(
            lower_s_twin(Algorithm::RS256, "h.p", &signature(&high)),
            None
        );
        assert_eq!(
            lower_s_twin(Algorithm::ES384, "h.p", &signature(&high)),
            None,
            "length"
        );
    }

    fn token_with_header(header: &Value) -> String {
        let segment = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
        format!(
            "{}.{}.c2lnbmF0dXJl",
            segment(header),
            segment(&serde_json::json!({"iss": "https://issuer.example"}))
        )
    }

    fn refusal(token: &str) -> TokenError {
        verify(
            token,
            &Issuers::default(),
            16 * 1024,
            0,
            &KeepClaims::All,
            &Interner::default(),
        )
        .expect_err("refused")
    }

    #[test]
    fn an_unknown_algorithm_is_named_quoted_and_escaped() {
        let token = token_with_header(
            &serde_json::json!({"alg": "\r\nFORGED\u{1b}[2K x:ok", "typ": "JWT"}),
        );
        let error = refusal(&token);
        assert_eq!(
            error,
            TokenError::AlgorithmNotAllowed("\r\nFORGED\u{1b}[2K x:o".to_owned())
        );
        let message = error.to_string();
        assert_eq!(
            message,
            "the access token algorithm \"\\r\\nFORGED\\u{1b}[2K x:o\" is not allowed"
        );
        assert!(!message.chars().any(char::is_control), "{message:?}");
    }
}
