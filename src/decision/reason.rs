//! Reason codes: stable, machine-readable, one per distinct cause. They travel in responses, logs,
//! Envoy dynamic metadata and metrics labels, so renaming one is a breaking change.

use crate::identity::{CredentialProblem, TokenError};

/// Declares the enum, its codes and the list of all reasons from one table.
macro_rules! reasons {
    ($($variant:ident => $code:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($variant,)*
        }

        impl Reason {
            /// Every reason, for documentation and exhaustive tests.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }
        }
    };
}

reasons! {
    // ALLOW
    Allowed => "allowed",
    AnonymousAllowed => "anonymous_allowed",
    DefaultAllowed => "default_allowed",
    // 400
    MultipleCredentials => "multiple_credentials",
    MalformedAuthorization => "malformed_authorization",
    InvalidPath => "invalid_path",
    MalformedRequest => "malformed_request",
    // a host with a port or trailing dot that a host rule matches only without them, while the
    // proxy routes hosts as sent (`upstream.host_port: routed`)
    AmbiguousHost => "ambiguous_host",
    // a path that picks another rule read in its own letter case than in lower case, while the
    // upstream's reading of case is not known (`upstream.path_case: either`)
    AmbiguousPath => "ambiguous_path",
    // 413, 431
    RequestTooLarge => "request_too_large",
    TooManyHeaders => "too_many_headers",
    HeadersTooLarge => "headers_too_large",
    // 500: stepgate itself failed (a bug), and fails closed
    InternalError => "internal_error",
    // 401 without a usable token
    TokenMissing => "token_missing",
    TokenTooLarge => "token_too_large",
    TokenMalformed => "token_malformed",
    TokenTypeInvalid => "token_type_invalid",
    TokenHeaderForbidden => "token_header_forbidden",
    TokenUnverifiable => "token_unverifiable",
    AlgorithmNotAllowed => "algorithm_not_allowed",
    IssuerUnknown => "issuer_unknown",
    UnknownKid => "unknown_kid",
    KeyMismatch => "key_mismatch",
    SignatureInvalid => "signature_invalid",
    TokenExpired => "token_expired",
    TokenNotYetValid => "token_not_yet_valid",
    AudienceMismatch => "audience_mismatch",
    ClaimInvalid => "claim_invalid",
    IssuerNotAccepted => "issuer_not_accepted",
    TenantMismatch => "tenant_mismatch",
    TenantNotAllowed => "tenant_not_allowed",
    // 401: a token bound to a client certificate (RFC 8705), on a request without that
    // certificate: none, another one, or one the proxy's field does not hold as one PEM certificate
    ClientCertificateMissing => "client_certificate_missing",
    ClientCertificateMismatch => "client_certificate_mismatch",
    ClientCertificateInvalid => "client_certificate_invalid",
    // 401: the rule takes only tokens bound to a client certificate, and the token is a bearer
    // token
    TokenNotBound => "token_not_bound",
    // 401 (a claims challenge for Entra clients that handle one): an operator revoked the
    // subject's sessions after this token was issued
    SessionRevoked => "session_revoked",
    // 403
    MissingScope => "missing_scope",
    MissingRole => "missing_role",
    ClaimMismatch => "claim_mismatch",
    ConditionFailed => "condition_failed",
    ConditionError => "condition_error",
    NoMatchingRule => "no_matching_rule",
    ClientNotCapable => "client_not_capable",
    AppOnlyToken => "app_only_token",
    StepUpNotExpressible => "step_up_not_expressible",
    // 403: the caller of `Check` is not among the proxies allowed to call it (`--check-from`,
    // `--check-client-san`); nothing of the request was read
    CallerNotAllowed => "caller_not_allowed",
    // 403 by an operator's block (admin API)
    Blocked => "blocked",
    SourceBlocked => "source_blocked",
    // 503: the shared risk store is unreachable and the policy fails closed
    RiskStoreUnavailable => "risk_store_unavailable",
    // 503: the request's unfinished bytes do not fit what the process may hold (a Check body
    // arriving in pieces, `--max-buffered-bytes`)
    Overloaded => "overloaded",
    // 503: the call was not decided before its deadline (its body still arriving, a wait for an
    // unknown key): answered just before it, so that the proxy reads a denial, not a timeout
    DeadlineExceeded => "deadline_exceeded",
    // STEP_UP (or 403 where the issuer cannot challenge)
    MissingAuthContext => "missing_auth_context",
    AcrNotAccepted => "acr_not_accepted",
    MissingAmr => "missing_amr",
    AuthTimeMissing => "auth_time_missing",
    AuthTooOld => "auth_too_old",
}

impl Reason {
    /// Whether the request presented a token that was refused as invalid (malformed, forged,
    /// expired, of an unknown issuer or tenant): what a `count: invalid_token` risk signal counts.
    pub fn is_invalid_token(self) -> bool {
        matches!(
            self,
            Reason::TokenTooLarge
                | Reason::TokenMalformed
                | Reason::TokenTypeInvalid
                | Reason::TokenHeaderForbidden
                | Reason::TokenUnverifiable
                | Reason::AlgorithmNotAllowed
                | Reason::IssuerUnknown
                | Reason::UnknownKid
                | Reason::KeyMismatch
                | Reason::SignatureInvalid
                | Reason::TokenExpired
                | Reason::TokenNotYetValid
                | Reason::AudienceMismatch
                | Reason::ClaimInvalid
                | Reason::TenantMismatch
                | Reason::TenantNotAllowed
                | Reason::ClientCertificateMissing
                | Reason::ClientCertificateMismatch
                | Reason::ClientCertificateInvalid
        )
    }
}

impl From<&TokenError> for Reason {
    fn from(err: &TokenError) -> Self {
        match err {
            TokenError::TooLarge { .. } => Reason::TokenTooLarge,
            TokenError::Malformed(_) => Reason::TokenMalformed,
            TokenError::ForbiddenHeader(_) => Reason::TokenHeaderForbidden,
            TokenError::Unverifiable => Reason::TokenUnverifiable,
            TokenError::AlgorithmNotAllowed(_) => Reason::AlgorithmNotAllowed,
            TokenError::IssuerUnknown => Reason::IssuerUnknown,
            TokenError::UnknownKey { .. } => Reason::UnknownKid,
            TokenError::TenantMismatch => Reason::TenantMismatch,
            TokenError::TenantNotAllowed => Reason::TenantNotAllowed,
            TokenError::KeyMismatch => Reason::KeyMismatch,
            TokenError::SignatureInvalid => Reason::SignatureInvalid,
            TokenError::Expired => Reason::TokenExpired,
            TokenError::NotYetValid => Reason::TokenNotYetValid,
            TokenError::AudienceMismatch => Reason::AudienceMismatch,
            TokenError::ClaimInvalid(_) => Reason::ClaimInvalid,
            TokenError::WrongType(_) | TokenError::IdToken | TokenError::Bound => {
                Reason::TokenTypeInvalid
            }
        }
    }
}

impl From<CredentialProblem> for Reason {
    fn from(problem: CredentialProblem) -> Self {
        match problem {
            CredentialProblem::MultipleCredentials => Reason::MultipleCredentials,
            _ => Reason::MalformedAuthorization,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_reason_is_documented_in_the_policy_reference() {
        let reference = include_str!("../../docs/policy.md");
        for reason in Reason::ALL {
            let code = format!("`{}`", reason.as_str());
            assert!(
                reference.contains(&code),
                "docs/policy.md does not document {code}"
            );
        }
    }

    #[test]
    fn codes_are_unique_snake_case() {
        let codes: HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
        assert!(
            codes
                .iter()
                .all(|c| c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'))
        );
    }
}
