//! The compiled policy: what `evaluate` reads on every request.
//!
//! A `Policy` is built once from the policy file by [`compile`] (patterns prepared, CEL parsed,
//! issuers resolved, every reference checked) and is immutable afterwards; a reload builds a new one
//! and swaps it in whole. A policy that does not compile is never served.

mod compile;
pub mod condition;
pub mod index;
pub mod pattern;
mod risk;
#[cfg(test)]
pub(crate) mod testing;

use std::{collections::BTreeMap, sync::Arc};

pub use compile::compile;
use condition::Condition;
use pattern::{HostPattern, PathGlob, Wildcard};

use crate::{
    identity::{
        Issuers, TokenCache,
        san::{self, SanName},
    },
    request::{HeaderLimits, path::PathParameters},
    risk::signals::RiskPolicy,
};

pub struct Policy {
    pub realm: String,
    pub issuers: Issuers,
    pub auth_contexts: BTreeMap<String, AuthContext>,
    pub rules: Vec<Rule>,
    /// The rules' matchers filed for lookup ([`index`]).
    pub index: index::RuleIndex,
    pub default: DefaultAction,
    pub upstream: Upstream,
    pub max_token_bytes: usize,
    /// Bounds on a request's headers; past them the request is answered 431.
    pub header_limits: HeaderLimits,
    pub cel: Arc<cel::Env>,
    /// Who may ask `Decide` for an `explain` trace.
    pub explain: ExplainAccess,
    /// Who may call the admin API.
    pub admin: AdminAccess,
    /// Risk signals and the shared store's settings.
    pub risk: RiskPolicy,
    /// Decision records.
    pub records: crate::telemetry::records::RecordsPolicy,
    /// Tokens verified under this policy (a reload starts a new cache).
    pub token_cache: TokenCache,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthContext {
    pub id: String,
    pub description: String,
    pub max_age: Option<u64>,
    /// The Entra claims request asking for this context (minified JSON) and its base64 form,
    /// rendered once at load rather than on every step-up.
    pub claims_request: String,
    pub claims_base64: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Deny,
    AllowAuthenticated,
}

#[derive(Debug)]
pub struct Rule {
    pub id: Arc<str>,
    pub description: String,
    /// The rule applies when any matcher matches.
    pub matchers: Vec<Matcher>,
    /// Issuer ids whose tokens the rule accepts; empty means any configured issuer.
    pub issuers: Vec<String>,
    pub allow_anonymous: bool,
    pub require: Requirement,
    pub escalate: Vec<Escalation>,
    /// Evaluated and recorded, never enforced: the next matching rule decides.
    pub shadow: bool,
}

impl Rule {
    /// Every CEL condition of the rule: its matchers', its requirement's, its escalations' and
    /// their requirements'.
    pub fn conditions(&self) -> impl Iterator<Item = &Condition> {
        let matchers = self.matchers.iter().filter_map(|m| m.when.as_deref());
        let requirements = std::iter::once(&self.require)
            .chain(self.escalate.iter().map(|e| &e.require))
            .filter_map(|r| r.when.as_deref());
        let escalations = self.escalate.iter().map(|e| &e.when);
        matchers.chain(requirements).chain(escalations)
    }
}

/// Every present field must match.
#[derive(Debug, Default)]
pub struct Matcher {
    pub operation: Option<Wildcard>,
    pub methods: Vec<String>,
    pub hosts: Vec<HostPattern>,
    pub paths: Vec<PathGlob>,
    /// Boxed, as `when`: most matchers have neither, and a policy of 200 000 rules holds
    /// 400 000 matchers.
    pub grpc: Option<Box<GrpcMatcher>>,
    pub when: Option<Box<Condition>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcMatcher {
    pub service: Wildcard,
    pub method: Option<Wildcard>,
}

/// What a token must show. Authorization parts (scopes, roles, claims, `when`) refuse with 403;
/// authentication parts (auth contexts, acr, amr, max age) ask for a step-up.
#[derive(Debug, Default)]
pub struct Requirement {
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    pub claims: Vec<ClaimRequirement>,
    /// Boxed: most requirements have none.
    pub when: Option<Box<Condition>>,
    pub auth_contexts: Vec<String>,
    pub acr: Vec<String>,
    pub amr: Vec<String>,
    pub max_age: Option<u64>,
    /// Only a token bound to the client certificate the request was made with (RFC 8705).
    pub certificate_bound: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClaimRequirement {
    pub claim: String,
    /// Any of these values satisfies the requirement.
    pub any_of: Vec<serde_json::Value>,
}

#[derive(Debug)]
pub struct Escalation {
    pub when: Condition,
    pub require: Requirement,
    /// Recorded when it holds, never enforced.
    pub shadow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Header name (shared with every decision that sets it) and where its value comes from.
    pub identity_headers: Vec<(Arc<str>, HeaderSource)>,
    pub remove_authorization: bool,
    /// The proxy's header-count limit (0: unchecked).
    pub max_request_headers: usize,
    /// Whether the upstream cuts path parameters (`;…`) or they are refused.
    pub path_parameters: PathParameters,
    /// Whether the proxy routes a host with its port and trailing dot as sent (Envoy's default):
    /// host rules then match only when the host as sent and the host without them agree.
    pub host_port_routed: bool,
    /// How the upstream reads a path's letter case, and so how rules match it.
    pub path_case: PathCase,
    /// Whether the upstream may serve a path with an extension on its last segment
    /// (`/payments/wire.json`) from the route without it (`upstream.format_suffix: either`):
    /// the path must then pick the same rule read both ways.
    pub format_suffix_either: bool,
    /// The characters the rules' path globs spell as they are, whose escapes in a request's
    /// path upstreams read two ways.
    pub spelled: crate::request::path::Spelled,
}

/// What letter case means to the upstream's routes (`upstream.path_case`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PathCase {
    /// Not known: a path must pick the same rule read in lower case and read in its own case
    /// (the glob as written against the path as sent), or it is refused (`ambiguous_path`).
    #[default]
    Either,
    /// Routes ignore case (ASP.NET Core, IIS): rules match in lower case.
    Insensitive,
    /// Routes are case-sensitive (Go, Flask, Spring): rules match in the case of each.
    Sensitive,
}

/// Where an identity header's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderSource {
    Subject,
    Issuer,
    IssuerId,
    Tenant,
    ClientId,
    Acrs,
    Acr,
    Amr,
    Scopes,
    Roles,
    AuthTime,
    Rule,
    Claim(String),
}

impl Upstream {
    /// Headers to strip from an allowed request: configured identity headers the decision did not
    /// set, and `authorization` when configured.
    pub fn headers_to_remove<'a>(
        &'a self,
        set: &'a [(Arc<str>, Arc<str>)],
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.identity_headers
            .iter()
            .map(|(name, _)| &**name)
            .filter(|name| !set.iter().any(|(s, _)| &**s == *name))
            .chain(self.remove_authorization.then_some("authorization"))
    }
}

impl Requirement {
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty()
            && self.roles.is_empty()
            && self.claims.is_empty()
            && self.when.is_none()
            && self.auth_contexts.is_empty()
            && self.acr.is_empty()
            && self.amr.is_empty()
            && self.max_age.is_none()
            && !self.certificate_bound
    }
}

/// Who may ask `Decide` for an `explain` trace: nobody unless enabled, then only the callers
/// named, by the client certificate's subject alternative names or by the listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExplainAccess {
    pub enabled: bool,
    pub client_sans: Vec<SanName>,
    pub admin_listener: bool,
}

impl ExplainAccess {
    /// Whether a caller on `admin_listener` (or not) with these verified client certificate
    /// names may have an explain trace.
    pub fn permits(&self, on_admin_listener: bool, client_sans: &[SanName]) -> bool {
        self.enabled
            && ((self.admin_listener && on_admin_listener)
                || san::any_allowed(client_sans, &self.client_sans))
    }
}

/// Who may call the admin API: a verified client certificate naming one of `client_sans`, or a
/// token of one of `issuers` carrying one of `roles`.
#[derive(Debug, Default)]
pub struct AdminAccess {
    pub client_sans: Vec<SanName>,
    pub issuers: Vec<String>,
    pub roles: Vec<String>,
    /// One of these must be in an admin token's `aud` (empty: any its issuer accepts).
    pub audiences: Vec<String>,
    /// `admin.require`, as a rule a token calling the admin API must meet (`None`: the role
    /// suffices).
    pub rule: Option<Rule>,
}

impl AdminAccess {
    /// Whether anybody may call it.
    pub fn anyone(&self) -> bool {
        !self.client_sans.is_empty() || !self.roles.is_empty()
    }
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("realm", &self.realm)
            .field("issuers", &self.issuers)
            .field("rules", &self.rules)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl Policy {
    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| &*r.id == id)
    }
}
