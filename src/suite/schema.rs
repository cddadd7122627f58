//! A policy test suite as written: serde types, unknown fields refused (a misspelt expectation
//! would silently test nothing).

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Deserializer, de};
use serde_json::{Map, Value};

use crate::config::duration::Seconds;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteFile {
    /// The time every case is decided at unless it gives its own (default: the clock).
    #[serde(default)]
    pub now: Option<Time>,
    pub cases: Vec<CaseConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseConfig {
    pub name: String,
    #[serde(default)]
    pub now: Option<Time>,
    pub request: RequestConfig,
    /// The caller as a token: its issuer and claims (registered claims filled in).
    #[serde(default)]
    pub token: Option<TokenConfig>,
    /// The caller as a verified principal (turned into a token of its issuer).
    #[serde(default)]
    pub principal: Option<PrincipalConfig>,
    pub expect: ExpectConfig,
}

/// A `Decide` call (`operation`, `attributes`) or an HTTP request (`method`, `host`, `path`,
/// `headers`), and optionally where it came from (Envoy's `source.address`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestConfig {
    pub operation: Option<String>,
    #[serde(default)]
    pub attributes: Map<String, Value>,
    pub method: Option<String>,
    pub host: Option<String>,
    pub path: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub source: Option<String>,
    /// The thumbprint (`x5t#S256`: unpadded base64url of the SHA-256 of its DER) of the client
    /// certificate the request was made with; a token bound to one (`cnf`) needs it.
    pub client_certificate: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The issuer's id in the policy.
    pub issuer: String,
    /// Claims, over the filled-in `iss`, `aud`, `sub`, `iat`, `nbf` and `exp`.
    #[serde(default)]
    pub claims: Map<String, Value>,
    /// `auth_time` this long before `now`.
    #[serde(default)]
    pub auth_age: Option<Seconds>,
    /// How long the token lives from `now` (default 1h).
    #[serde(default)]
    pub lifetime: Option<Seconds>,
    /// Expired an hour ago.
    #[serde(default)]
    pub expired: bool,
    /// Signed over other bytes: a forged token.
    #[serde(default)]
    pub forged: bool,
    /// The header's `typ` (`""`: none). By default what the issuer's provider sends: `JWT`, or
    /// `at+jwt` for an issuer with `require_at_jwt` that is not Entra ID's.
    #[serde(default)]
    pub typ: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalConfig {
    pub issuer: String,
    #[serde(default = "default_subject")]
    pub subject: String,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    #[serde(default)]
    pub acrs: Vec<String>,
    pub acr: Option<String>,
    #[serde(default)]
    pub amr: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Client capabilities (`cp1`: the client handles claims challenges).
    #[serde(default)]
    pub xms_cc: Vec<String>,
    /// Since the sign-in (default 0: just now).
    #[serde(default)]
    pub auth_age: Option<Seconds>,
    /// An application's token (`idtyp: app`, no delegated scopes); a user's by default.
    #[serde(default)]
    pub app_only: bool,
}

fn default_subject() -> String {
    "test-user".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectConfig {
    pub outcome: OutcomeConfig,
    pub reason: Option<String>,
    /// The deciding rule's id; `""` for none.
    pub rule: Option<String>,
    /// The HTTP status.
    pub status: Option<u16>,
    pub challenge: Option<ChallengeConfig>,
    /// What shadow rules and escalations would have answered, as the decision log writes them:
    /// `rule:OUTCOME:reason` (`rule/escalate[i]:…` for an escalation), in order; `[]` for none.
    pub shadow: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum OutcomeConfig {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "STEP_UP")]
    StepUp,
    #[serde(rename = "DENY")]
    Deny,
}

/// What a step-up asks; each field given is compared.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeConfig {
    pub auth_contexts: Option<Vec<String>>,
    pub acr_values: Option<Vec<String>>,
    pub max_age: Option<Seconds>,
    pub amr: Option<Vec<String>>,
}

/// A fixed time: unix seconds, or RFC 3339 (`2026-12-01T09:30:00Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Time(pub i64);

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Time;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("unix seconds or an RFC 3339 time such as 2026-12-01T09:30:00Z")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Time, E> {
                Ok(Time(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Time, E> {
                i64::try_from(v).map(Time).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Time, E> {
                parse_rfc3339(v).map(Time).ok_or_else(|| {
                    E::custom(format!(
                        "expected an RFC 3339 time such as 2026-12-01T09:30:00Z, got {v:?}"
                    ))
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// An RFC 3339 time (any offset) → unix seconds.
fn parse_rfc3339(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_times_are_unix_seconds() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-12-01T09:30:00Z"), Some(1_796_117_400));
        assert_eq!(parse_rfc3339("2024-02-29T23:59:59Z"), Some(1_709_251_199));
        assert_eq!(
            parse_rfc3339("2026-12-01T10:30:00+01:00"),
            Some(1_796_117_400)
        );
        for bad in ["2023-02-29T00:00:00Z", "2026-12-01", "2026-13-01T00:00:00Z"] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
