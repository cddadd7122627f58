//! Reading the claims stepgate decides on, tolerant of the shapes identity providers really send
//! (`scp` as a space-separated string, `amr` as an array, `xms_cc` as either) and strict about types:
//! a claim of the wrong JSON type makes the token invalid rather than silently empty.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::{
    intern::Interner,
    issuer::{ChallengeStyle, Issuer},
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
    pub scopes: Arc<[Arc<str>]>,
    pub roles: Arc<[Arc<str>]>,
    /// An application acting as itself: it has no user to step up.
    pub app_only: bool,
    pub expires_at: i64,
}

fn list(
    claims: &Map<String, Value>,
    name: &'static str,
    interner: &Interner,
) -> Result<Arc<[Arc<str>]>, TokenError> {
    let values = str_list(claims, name).ok_or(TokenError::ClaimInvalid(name))?;
    Ok(interner.list(values))
}

/// Reads a claim that may be a string, a space-separated string or an array of strings. `None`
/// when the claim has another JSON type.
pub fn str_list<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<Vec<&'a str>> {
    match claims.get(name) {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::String(s)) => Some(s.split_ascii_whitespace().collect()),
        Some(Value::Array(items)) => items.iter().map(Value::as_str).collect(),
        Some(_) => None,
    }
}

fn str<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(TokenError::ClaimInvalid(name)),
    }
}

pub(super) fn read_principal(
    issuer: &Issuer,
    claims: &Map<String, Value>,
    interner: &Interner,
) -> Result<Principal, TokenError> {
    let shared = |value: Option<&str>| value.map(|v| interner.string(v));
    let subject = str(claims, "sub")?.unwrap_or_default();
    let client_id = match str(claims, "azp")? {
        Some(id) => Some(id),
        None => match str(claims, "appid")? {
            Some(id) => Some(id),
            None => str(claims, "client_id")?,
        },
    };
    let mut scope_values = str_list(claims, "scp").ok_or(TokenError::ClaimInvalid("scp"))?;
    scope_values.extend(str_list(claims, "scope").ok_or(TokenError::ClaimInvalid("scope"))?);
    let has_delegated_scope = claims.contains_key("scp") || claims.contains_key("scope");
    let idtyp = str(claims, "idtyp")?;
    // Entra: delegated (user) tokens always carry `scp`; application tokens carry only `roles`.
    let app_only = idtyp == Some("app")
        || (issuer.challenge == ChallengeStyle::Entra && !has_delegated_scope)
        || subject.is_empty();
    let acrs: Vec<String> = str_list(claims, "acrs")
        .ok_or(TokenError::ClaimInvalid("acrs"))?
        .into_iter()
        .map(str::to_ascii_lowercase)
        .collect();
    Ok(Principal {
        issuer_id: interner.string(&issuer.id),
        // The token's own `iss` (for a `{tenantid}` or discovered issuer the policy text is not it).
        issuer: interner.string(str(claims, "iss")?.unwrap_or_default()),
        subject: Arc::from(subject),
        tenant: shared(str(claims, "tid")?),
        client_id: shared(client_id),
        acrs: interner.list(acrs.iter().map(String::as_str)),
        acr: shared(str(claims, "acr")?),
        amr: list(claims, "amr", interner)?,
        auth_time: numeric_date(claims, "auth_time")?,
        scopes: interner.list(scope_values),
        roles: list(claims, "roles", interner)?,
        app_only,
        expires_at: numeric_date(claims, "exp")?.unwrap_or_default(),
    })
}
