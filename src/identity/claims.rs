//! Reading the claims stepgate decides on, tolerant of the shapes identity providers really send
//! (`scp` as a space-separated string, `amr` as an array, `xms_cc` as either) and strict about types:
//! a claim of the wrong JSON type makes the token invalid rather than silently empty.

use serde_json::{Map, Value};

use super::{
    issuer::{ChallengeStyle, Issuer},
    token::{TokenError, numeric_date},
};

/// The verified caller, as the decision and the upstream see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    pub issuer_id: String,
    pub issuer: String,
    pub subject: String,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    /// Entra authentication contexts (`acrs`), lower-cased.
    pub acrs: Vec<String>,
    pub acr: Option<String>,
    pub amr: Vec<String>,
    pub auth_time: Option<i64>,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    /// An application acting as itself: it has no user to step up.
    pub app_only: bool,
    pub expires_at: i64,
}

/// Reads a claim that may be a string, a space-separated string or an array of strings. `None`
/// when the claim has another JSON type.
pub fn string_list(claims: &Map<String, Value>, name: &str) -> Option<Vec<String>> {
    match claims.get(name) {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::String(s)) => Some(s.split_ascii_whitespace().map(str::to_owned).collect()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(_) => None,
    }
}

fn list(claims: &Map<String, Value>, name: &'static str) -> Result<Vec<String>, TokenError> {
    string_list(claims, name).ok_or(TokenError::ClaimInvalid(name))
}

fn string(claims: &Map<String, Value>, name: &'static str) -> Result<Option<String>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenError::ClaimInvalid(name)),
    }
}

pub(super) fn read_principal(
    issuer: &Issuer,
    claims: &Map<String, Value>,
) -> Result<Principal, TokenError> {
    let subject = string(claims, "sub")?.unwrap_or_default();
    let client_id = match string(claims, "azp")? {
        Some(id) => Some(id),
        None => match string(claims, "appid")? {
            Some(id) => Some(id),
            None => string(claims, "client_id")?,
        },
    };
    let mut scopes = list(claims, "scp")?;
    scopes.extend(list(claims, "scope")?);
    let has_delegated_scope = claims.contains_key("scp") || claims.contains_key("scope");
    let idtyp = string(claims, "idtyp")?;
    // Entra: delegated (user) tokens always carry `scp`; application tokens carry only `roles`.
    let app_only = idtyp.as_deref() == Some("app")
        || (issuer.challenge == ChallengeStyle::Entra && !has_delegated_scope)
        || subject.is_empty();
    Ok(Principal {
        issuer_id: issuer.id.clone(),
        // The token's own `iss` (for a `{tenantid}` or discovered issuer the policy text is not it).
        issuer: string(claims, "iss")?.unwrap_or_default(),
        subject,
        tenant: string(claims, "tid")?,
        client_id,
        acrs: list(claims, "acrs")?
            .into_iter()
            .map(|c| c.to_ascii_lowercase())
            .collect(),
        acr: string(claims, "acr")?,
        amr: list(claims, "amr")?,
        auth_time: numeric_date(claims, "auth_time")?,
        scopes,
        roles: list(claims, "roles")?,
        app_only,
        expires_at: numeric_date(claims, "exp")?.unwrap_or_default(),
    })
}
