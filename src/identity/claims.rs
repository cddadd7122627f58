//! Reading the claims stepgate decides on, tolerant of the shapes identity providers really send
//! (`scp` as a space-separated string, `amr` as an array, `xms_cc` as either) and strict about types:
//! a claim of the wrong JSON type makes the token invalid rather than silently empty.

use std::sync::Arc;

use crate::risk::blocks::MAX_BLOCKED_VALUE_BYTES;

use super::{
    intern::Tables,
    issuer::{ChallengeStyle, Issuer, SubjectClaim},
    segments::{Claims, Raw},
    token::{TokenError, numeric_date},
};

/// The verified caller, as the decision and the upstream see it. Values many tokens repeat are
/// shared (see [`super::intern`]); a decision holds the principal by `Arc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    pub issuer_id: Arc<str>,
    pub issuer: Arc<str>,
    pub subject: Arc<str>,
    pub tenant: Option<Arc<str>>,
    pub client_id: Option<Arc<str>>,
    /// Entra authentication contexts (`acrs`), lower-cased.
    pub acrs: Arc<[Arc<str>]>,
    pub acr: Option<Arc<str>>,
    pub amr: Arc<[Arc<str>]>,
    pub auth_time: Option<i64>,
    /// `iat`, when the token has one.
    pub issued_at: Option<i64>,
    /// The token's own id: `jti`, or Entra's `uti`.
    pub token_id: Option<Arc<str>>,
    /// Entra: the client declared it handles claims challenges (`xms_cc` ∋ `cp1`).
    pub claims_challenge_capable: bool,
    pub scopes: Arc<[Arc<str>]>,
    pub roles: Arc<[Arc<str>]>,
    /// An application acting as itself: it has no user to step up.
    pub app_only: bool,
    pub expires_at: i64,
}

impl Principal {
    /// When the session behind the token began, as a revocation judges it: the earlier of its
    /// `iat` and its `auth_time`. A token refreshed after a revocation has a new `iat` but the
    /// old sign-in's `auth_time`: only a new sign-in ends a revocation.
    pub fn issued(&self) -> Option<i64> {
        match (self.issued_at, self.auth_time) {
            (Some(iat), Some(auth_time)) => Some(iat.min(auth_time)),
            (iat, auth_time) => iat.or(auth_time),
        }
    }

    /// A copy that shares no allocation with `self` (its strings and lists copied): a worker
    /// thread's own, whose reference counts no other core writes.
    pub fn unshared(&self) -> Self {
        let text = |s: &Arc<str>| Arc::from(&**s);
        let list = |l: &Arc<[Arc<str>]>| l.iter().map(text).collect();
        Self {
            issuer_id: text(&self.issuer_id),
            issuer: text(&self.issuer),
            subject: text(&self.subject),
            tenant: self.tenant.as_ref().map(text),
            client_id: self.client_id.as_ref().map(text),
            acrs: list(&self.acrs),
            acr: self.acr.as_ref().map(text),
            amr: list(&self.amr),
            token_id: self.token_id.as_ref().map(text),
            scopes: list(&self.scopes),
            roles: list(&self.roles),
            ..self.clone()
        }
    }
}

fn list(
    value: Option<&Raw>,
    name: &'static str,
    interner: &mut Tables,
) -> Result<Arc<[Arc<str>]>, TokenError> {
    let values = str_list(value).ok_or(TokenError::ClaimInvalid(name))?;
    Ok(interner.list(values))
}

/// Reads a claim that may be one string or an array of strings (`roles`, `amr`, `acrs`,
/// `xms_cc`): a string is one value, spaces and all, so one role named `Order Admin` is not the
/// roles `Order` and `Admin`. `None` when the claim has another JSON type.
pub fn str_list<'a>(value: Option<&'a Raw>) -> Option<Vec<&'a str>> {
    match value {
        None | Some(Raw::Null) => Some(Vec::new()),
        Some(Raw::Str(s)) if s.is_empty() => Some(Vec::new()),
        Some(Raw::Str(s)) => Some(vec![s]),
        Some(Raw::StrList(items)) => Some(items.iter().map(|item| &**item).collect()),
        Some(_) => None,
    }
}

/// Reads a scope claim (`scope`, `scp`): a space-separated string (RFC 8693 section 4.2, RFC
/// 9068) or an array of strings, whose items are not split. `None` when the claim has another
/// JSON type.
pub fn scope_list<'a>(value: Option<&'a Raw>) -> Option<Vec<&'a str>> {
    match value {
        Some(Raw::Str(s)) => Some(s.split_ascii_whitespace().collect()),
        other => str_list(other),
    }
}

fn str<'a>(value: Option<&'a Raw>, name: &'static str) -> Result<Option<&'a str>, TokenError> {
    match value {
        None | Some(Raw::Null) => Ok(None),
        Some(Raw::Str(s)) => Ok(Some(s)),
        Some(_) => Err(TokenError::ClaimInvalid(name)),
    }
}

/// [`str`] for a claim an operator or a risk signal may block by (the subject, tenant, client,
/// token id): one longer than a block can hold ([`MAX_BLOCKED_VALUE_BYTES`]) is refused, or its
/// holder could never be blocked or revoked by it. OpenID Connect holds `sub` to 255 ASCII
/// characters.
fn blockable<'a>(
    value: Option<&'a Raw>,
    name: &'static str,
) -> Result<Option<&'a str>, TokenError> {
    match str(value, name)? {
        Some(s) if s.len() > MAX_BLOCKED_VALUE_BYTES => Err(TokenError::ClaimInvalid(name)),
        other => Ok(other),
    }
}

pub(super) fn read_principal(
    issuer: &Issuer,
    claims: &Claims,
    interner: &mut Tables,
) -> Result<Principal, TokenError> {
    let subject = match issuer.subject_claim {
        SubjectClaim::Sub => blockable(claims.sub.as_ref(), "sub")?.unwrap_or_default(),
        // Named by the policy as the subject: a token without one names nobody it can block.
        SubjectClaim::Oid => blockable(claims.oid.as_ref(), "oid")?
            .filter(|oid| !oid.is_empty())
            .ok_or(TokenError::ClaimInvalid("oid"))?,
    };
    let client_id = match blockable(claims.azp.as_ref(), "azp")? {
        Some(id) => Some(id),
        None => match blockable(claims.appid.as_ref(), "appid")? {
            Some(id) => Some(id),
            // RFC 9068's `client_id`, then Okta's `cid`.
            // `cid` is read only as a string: another provider's `cid` of another kind (a
            // number) is not a client id, and no reason to refuse the token.
            None => match blockable(claims.client_id.as_ref(), "client_id")? {
                Some(id) => Some(id),
                None => match str(claims.cid.as_ref(), "cid") {
                    Ok(Some(id)) if id.len() > MAX_BLOCKED_VALUE_BYTES => {
                        return Err(TokenError::ClaimInvalid("cid"));
                    }
                    read => read.ok().flatten(),
                },
            },
        },
    };
    let mut scope_values =
        scope_list(claims.scp.as_ref()).ok_or(TokenError::ClaimInvalid("scp"))?;
    scope_values
        .extend(scope_list(claims.scope.as_ref()).ok_or(TokenError::ClaimInvalid("scope"))?);
    let has_delegated_scope = claims.scp.is_some() || claims.scope.is_some();
    let idtyp = str(claims.idtyp.as_ref(), "idtyp")?;
    // Entra: delegated (user) tokens always carry `scp`; application tokens carry only `roles`.
    let app_only = idtyp == Some("app")
        || (issuer.challenge == ChallengeStyle::Entra && !has_delegated_scope)
        || subject.is_empty();
    // Authentication contexts are Entra's. An RFC 9470 issuer's step-up cannot ask for one, and
    // an `acrs` in its tokens means whatever that provider (or whoever may add claims there)
    // puts in it: it satisfies nothing.
    let acrs: Vec<String> = if issuer.challenge == ChallengeStyle::Rfc9470 {
        Vec::new()
    } else {
        str_list(claims.acrs.as_ref())
            .ok_or(TokenError::ClaimInvalid("acrs"))?
            .into_iter()
            .map(str::to_ascii_lowercase)
            .collect()
    };
    Ok(Principal {
        issuer_id: Arc::clone(&issuer.id),
        // The token's own `iss` (for a `{tenantid}` or discovered issuer the policy text is not it).
        issuer: interner.string(str(claims.iss.as_ref(), "iss")?.unwrap_or_default()),
        subject: Arc::from(subject),
        tenant: blockable(claims.tid.as_ref(), "tid")?.map(|tid| interner.string(tid)),
        client_id: client_id.map(|id| interner.string(id)),
        acrs: interner.list(acrs.iter().map(String::as_str)),
        acr: str(claims.acr.as_ref(), "acr")?.map(|acr| interner.string(acr)),
        amr: list(claims.amr.as_ref(), "amr", interner)?,
        auth_time: numeric_date(claims.auth_time.as_ref(), "auth_time")?,
        issued_at: numeric_date(claims.iat.as_ref(), "iat")?,
        // Unique per token: not shared through the interner.
        token_id: match blockable(claims.jti.as_ref(), "jti")? {
            Some(jti) => Some(Arc::from(jti)),
            None => blockable(claims.uti.as_ref(), "uti")?.map(Arc::from),
        },
        claims_challenge_capable: false,
        scopes: interner.list(scope_values),
        roles: list(claims.roles.as_ref(), "roles", interner)?,
        app_only,
        expires_at: numeric_date(claims.exp.as_ref(), "exp")?.unwrap_or_default(),
    })
}
