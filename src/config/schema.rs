//! The policy file as written: serde types that mirror the YAML one to one.
//!
//! Every struct denies unknown fields, because a misspelt key (`requires:` for `require:`) that were
//! silently ignored would weaken a policy without anyone noticing. Meaning is checked later, in
//! `policy::compile`, which reports errors with the same field paths.

use std::{collections::BTreeMap, fmt, marker::PhantomData};

use serde::{
    Deserialize, Deserializer,
    de::{self, value::MapAccessDeserializer, value::SeqAccessDeserializer},
};

use super::{
    byte_size::ByteSize,
    duration::{Seconds, Span},
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// `realm` of the `WWW-Authenticate: Bearer realm="…"` challenge sent when no token is presented.
    #[serde(default = "default_realm")]
    pub realm: String,
    pub issuers: Vec<IssuerConfig>,
    #[serde(default, deserialize_with = "unique_keys")]
    pub auth_contexts: BTreeMap<String, AuthContextConfig>,
    pub rules: Vec<RuleConfig>,
    /// What happens when no rule matches.
    #[serde(default)]
    pub default: DefaultAction,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Who may ask `Decide` for an `explain` trace (it reveals rules and conditions).
    #[serde(default)]
    pub explain: ExplainConfig,
    /// Who may call the admin API (`stepgate.v1.AdminService`, on `--admin-listen`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Risk signals counted over sliding windows, what crossing them does, and where the shared
    /// state (counters, blocks, revocations) is kept.
    #[serde(default)]
    pub risk: RiskConfig,
    /// Decision records: one JSON line per decision, apart from the application log.
    #[serde(default)]
    pub records: RecordsConfig,
}

/// The `records:` section (docs/records.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// The file records are appended to; `-` (the default) for stdout. Read at start.
    #[serde(default = "default_records_path")]
    pub path: String,
    /// Size at which the file is rotated (`path.1`, `path.2`, …).
    #[serde(default = "default_records_max_bytes")]
    pub max_bytes: ByteSize,
    /// Rotated files kept.
    #[serde(default = "default_records_keep")]
    pub keep: u32,
    /// Share of ALLOWs recorded, 0 to 1 (every STEP_UP and DENY is).
    #[serde(default = "default_records_allow_sample")]
    pub allow_sample: f64,
    /// Records of decisions without a verified token kept per second at most (`0`: all).
    #[serde(default = "default_records_unverified_per_second")]
    pub unverified_per_second: u32,
    /// `Decide` attributes recorded (none by default).
    #[serde(default)]
    pub attributes: Vec<String>,
    /// A file holding a secret key (at least 16 bytes): subjects are recorded as
    /// HMAC-SHA256 under it instead of in clear (relative to the policy file).
    #[serde(default)]
    pub subject_key_file: Option<String>,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: default_records_path(),
            max_bytes: default_records_max_bytes(),
            keep: default_records_keep(),
            allow_sample: default_records_allow_sample(),
            unverified_per_second: default_records_unverified_per_second(),
            attributes: Vec::new(),
            subject_key_file: None,
        }
    }
}

fn default_records_path() -> String {
    "-".to_owned()
}
fn default_records_max_bytes() -> ByteSize {
    ByteSize(100 * 1024 * 1024)
}
fn default_records_keep() -> u32 {
    5
}
fn default_records_allow_sample() -> f64 {
    1.0
}
fn default_records_unverified_per_second() -> u32 {
    100
}

/// The `risk:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskConfig {
    /// `memory` (one replica; the default) or a Redis URL (`redis://host:6379/0`,
    /// `rediss://…` for TLS) shared by every replica. Read at start-up.
    #[serde(default)]
    pub store: Option<String>,
    /// What decisions do while the Redis store is unreachable: `keep_last` (decide from the last
    /// known blocks and revocations, count locally) or `fail_closed` (refuse every request, 503).
    #[serde(default)]
    pub on_store_failure: StoreFailureConfig,
    /// Keys tracked per signal; past it, the keys with the lowest counts make room.
    #[serde(default = "default_risk_max_keys")]
    pub max_keys: usize,
    /// Named signals (the name is what CEL reads as `risk.<name>`).
    #[serde(default, deserialize_with = "unique_keys")]
    pub signals: BTreeMap<String, SignalConfig>,
}

impl Default for RiskConfig {
    fn default() -> Self {
        Self {
            store: None,
            on_store_failure: StoreFailureConfig::default(),
            max_keys: default_risk_max_keys(),
            signals: BTreeMap::new(),
        }
    }
}

fn default_risk_max_keys() -> usize {
    100_000
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreFailureConfig {
    #[default]
    KeepLast,
    FailClosed,
}

/// One risk signal: what is counted, per what key, over which window, and what happens at the
/// threshold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalConfig {
    #[serde(default)]
    pub description: String,
    /// `deny`, `step_up`, `invalid_token` or `sources` (distinct source addresses).
    pub count: SignalEventConfig,
    /// `subject`, `source`, `client_id`, `tenant` or `token` (the token's fingerprint).
    pub key: SignalKeyConfig,
    pub window: Seconds,
    /// The count at which the action applies.
    pub threshold: u32,
    /// `log` (the default: shadow), `step_up` or `block`.
    #[serde(default)]
    pub action: SignalActionConfig,
    /// With `action: step_up`: the stronger authentication asked on every protected route while
    /// the count is at or past the threshold (auth_contexts, acr, amr, max_age).
    #[serde(default)]
    pub require: Option<RequireConfig>,
    /// With `action: block`: how long the key is blocked.
    #[serde(default)]
    pub block_for: Option<Seconds>,
    /// With `key: source`: the prefix length an IPv4 source is grouped by (32: each address).
    #[serde(default = "default_ipv4_prefix")]
    pub ipv4_prefix: u8,
    /// With `key: source`: the prefix length an IPv6 source is grouped by (64: one subnet, what
    /// one host is usually given).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

fn default_ipv4_prefix() -> u8 {
    32
}
fn default_ipv6_prefix() -> u8 {
    64
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignalEventConfig {
    Deny,
    StepUp,
    InvalidToken,
    Sources,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignalKeyConfig {
    Subject,
    Source,
    ClientId,
    Tenant,
    Token,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignalActionConfig {
    #[default]
    Log,
    StepUp,
    Block,
}

/// The admin API's callers: a client certificate naming one of `client_sans`, or a bearer token
/// of one of `issuers` carrying one of `roles`. Nobody by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub client_sans: Vec<String>,
    /// Issuer ids (of `issuers`) whose tokens may carry the admin role.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Roles (the token's `roles`) that grant the admin API.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Audiences an admin token must carry one of (each also among its issuer's `audiences`):
    /// the admin API's own, so that the protected API's tokens — which its upstreams and
    /// `Decide` callers see — cannot be replayed to it. Empty: any audience of the issuer.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// What an admin token must show besides its role, as a rule's `require` (scopes, roles,
    /// auth_contexts, acr, amr, max_age): a step-up for lifting a block or revoking sessions.
    pub require: Option<RequireConfig>,
}

/// `explain` on `Decide`: off unless enabled, and then only for the callers named here (either
/// way). `stepgate decide --config` (offline, reading the file) always explains.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Callers over mutual TLS whose client certificate names one of these subject alternative
    /// names (exact match: DNS name, URI such as a SPIFFE ID, or IP address).
    #[serde(default)]
    pub client_sans: Vec<String>,
    /// Callers on the `--admin-listen` listener.
    #[serde(default)]
    pub admin_listener: bool,
}

fn default_realm() -> String {
    "stepgate".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Short name used in rules, logs and metrics.
    pub id: String,
    /// Exact `iss` value of the tokens; `{tenantid}` stands for any tenant GUID (Entra
    /// multi-tenant, with `tenants` or `any_tenant`). May be left out with `discovery_url`.
    #[serde(default)]
    pub issuer: String,
    /// OIDC discovery document (`…/.well-known/openid-configuration`): `issuer` and `jwks_uri`
    /// are read from it.
    pub discovery_url: Option<String>,
    /// Where the signing keys are published; fetched at start-up and refreshed in the background.
    pub jwks_uri: Option<String>,
    /// A local JWKS file (relative paths are resolved against the policy file's folder).
    pub jwks_file: Option<String>,
    /// Key refresh and on-demand fetch timing.
    #[serde(default)]
    pub keys: KeysConfig,
    /// Tenant ids accepted by a `{tenantid}` issuer.
    #[serde(default)]
    pub tenants: Vec<String>,
    /// Accept every tenant of a `{tenantid}` issuer (an explicit switch: multi-tenant apps usually
    /// want a list).
    #[serde(default)]
    pub any_tenant: bool,
    /// Accepted `aud` values; a token must carry at least one.
    pub audiences: Vec<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Clock-skew tolerance for `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: Seconds,
    /// Refuse tokens that carry an ID token's own members (`nonce`, `at_hash`, `c_hash`): an ID
    /// token is meant for the client, and passes as an access token wherever the API's audience
    /// equals the client's id (one Entra app registration for both). `false` only for an identity
    /// provider that puts them into access tokens.
    #[serde(default = "default_true")]
    pub refuse_id_tokens: bool,
    /// Accept only RFC 9068 access tokens, whose header says `typ: at+jwt`: an ID token, or any
    /// other JWT the same keys sign, is refused whatever its claims. Only for an identity
    /// provider set up to type its access tokens so (check a real token's header first).
    #[serde(default)]
    pub require_at_jwt: bool,
    /// Accept a token bound to its holder's key (a `cnf` claim: DPoP, RFC 9449; a client
    /// certificate, RFC 8705) as a bearer token. Off: a token bound to a client certificate
    /// (`x5t#S256`) is good only with that certificate, and one bound any other way is refused,
    /// since stepgate checks no other proof. Only where the proxy in front checks the binding
    /// itself; such a token then meets no `certificate_bound` requirement.
    #[serde(default)]
    pub accept_bound_tokens: bool,
    /// The claim that names the token's subject: the one blocks, revocations, `key: subject`
    /// risk signals, records and identity headers use. `sub` (the default), or `oid`: Entra's
    /// `sub` is pairwise, another for each client application a user reaches the API through,
    /// while its `oid` names the user (or the application's service principal) in the tenant,
    /// whichever client asked for the token. With `oid`, a token without one is refused.
    #[serde(default)]
    pub subject_claim: SubjectClaimConfig,
    /// How a missing authentication is challenged: `entra`, `rfc9470` or `deny`.
    #[serde(default)]
    pub challenge: ChallengeStyleConfig,
    /// Entra ID challenge parameters (only with `challenge: entra`).
    #[serde(default)]
    pub entra: EntraConfig,
    /// PEM bundle of the CAs that sign this identity provider's https certificates (relative to
    /// the policy file). It replaces the bundled web roots for this issuer's discovery and key
    /// fetches: an IdP behind a private CA, and only that CA trusted for it.
    #[serde(default)]
    pub ca_file: Option<String>,
}

/// When keys are fetched. Defaults suit Entra ID, Okta, Keycloak and Auth0 alike.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Refresh interval when the key-set response has no `Cache-Control: max-age`.
    #[serde(default = "default_refresh")]
    pub refresh: Seconds,
    /// Bounds on an interval taken from `max-age`.
    #[serde(default = "default_min_refresh")]
    pub min_refresh: Seconds,
    #[serde(default = "default_max_refresh")]
    pub max_refresh: Seconds,
    /// First retry after a failed load; it doubles with each further failure, up to `refresh`.
    #[serde(default = "default_retry")]
    pub retry: Seconds,
    /// How long the last good key set is kept while refreshes fail; then it is dropped.
    #[serde(default = "default_max_stale")]
    pub max_stale: Seconds,
    /// At most one on-demand fetch per this period for tokens with an unknown `kid`.
    #[serde(default = "default_unknown_kid_cooldown")]
    pub unknown_kid_cooldown: Seconds,
    /// How long a request with an unknown `kid` waits for that fetch (keep it well under Envoy's
    /// ext_authz timeout).
    #[serde(default = "default_unknown_kid_wait")]
    pub unknown_kid_wait: Span,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            refresh: default_refresh(),
            min_refresh: default_min_refresh(),
            max_refresh: default_max_refresh(),
            retry: default_retry(),
            max_stale: default_max_stale(),
            unknown_kid_cooldown: default_unknown_kid_cooldown(),
            unknown_kid_wait: default_unknown_kid_wait(),
        }
    }
}

fn default_refresh() -> Seconds {
    Seconds(3600)
}
fn default_min_refresh() -> Seconds {
    Seconds(300)
}
fn default_max_refresh() -> Seconds {
    Seconds(86_400)
}
fn default_retry() -> Seconds {
    Seconds(15)
}
fn default_max_stale() -> Seconds {
    Seconds(86_400)
}
fn default_unknown_kid_cooldown() -> Seconds {
    Seconds(30)
}
fn default_unknown_kid_wait() -> Span {
    Span(std::time::Duration::from_millis(100))
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned()]
}
fn default_true() -> bool {
    true
}
fn default_leeway() -> Seconds {
    Seconds(60)
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SubjectClaimConfig {
    #[default]
    Sub,
    Oid,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeStyleConfig {
    Entra,
    #[default]
    Rfc9470,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// `authorization_uri` of the claims challenge. Microsoft's clients expect the v1 authorize path
    /// of the cloud's authority, e.g. `https://login.microsoftonline.us/common/oauth2/authorize`.
    #[serde(default = "default_authorization_uri")]
    pub authorization_uri: String,
    /// `realm` of the claims challenge: empty for the common endpoint, or the tenant.
    #[serde(default)]
    pub realm: String,
    /// The API's own client id, added as `client_id` to the challenge (Microsoft samples do; MSAL
    /// ignores it). Optional.
    pub client_id: Option<String>,
}

impl Default for EntraConfig {
    fn default() -> Self {
        Self {
            authorization_uri: default_authorization_uri(),
            realm: String::new(),
            client_id: None,
        }
    }
}

fn default_authorization_uri() -> String {
    "https://login.microsoftonline.com/common/oauth2/authorize".to_owned()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthContextConfig {
    #[serde(default)]
    pub description: String,
    /// Freshness every rule requiring this context demands of `auth_time`.
    pub max_age: Option<Seconds>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub id: String,
    #[serde(default)]
    pub description: String,
    /// One matcher or a list of matchers; the rule applies when any of them matches.
    #[serde(rename = "match")]
    pub matchers: OneOrMany<MatcherConfig>,
    /// Restrict the rule to tokens from these issuer ids. Tokens of other issuers get DENY.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Let requests through without a token (health checks, public pages). A presented token is
    /// still verified: an invalid one is refused.
    #[serde(default)]
    pub allow_anonymous: bool,
    #[serde(default)]
    pub require: RequireConfig,
    #[serde(default)]
    pub escalate: Vec<EscalationConfig>,
    /// `enforce` (the default), or `shadow`: the rule's would-be outcome is recorded (log,
    /// metric, explain, dynamic metadata) and the next matching rule decides.
    #[serde(default)]
    pub mode: ModeConfig,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModeConfig {
    #[default]
    Enforce,
    Shadow,
}

/// All fields present must match (AND). Empty matches everything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatcherConfig {
    /// Logical operation name of a `Decide` call; `*` matches any run of characters.
    pub operation: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    pub host: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Path glob: `*` matches within one segment, `**` any number of segments.
    pub path: Option<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    /// gRPC service (`package.Service`) and optional method, matched against `/package.Service/Method`.
    pub grpc: Option<GrpcMatcherConfig>,
    /// CEL condition over `request` and `claims`.
    pub when: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatcherConfig {
    pub service: String,
    pub method: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireConfig {
    /// A valid token is always required unless the rule allows anonymous access; stating it is
    /// documentation. `false` is refused: use `allow_anonymous`.
    pub authenticated: Option<bool>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub auth_contexts: Vec<String>,
    /// Acceptable `acr` values, most preferred first.
    #[serde(default)]
    pub acr: Vec<String>,
    /// `amr` values the token must all carry.
    #[serde(default)]
    pub amr: Vec<String>,
    pub max_age: Option<Seconds>,
    /// Only a token bound to the client certificate the request was made with (`cnf.x5t#S256`,
    /// RFC 8705), as FAPI 2.0 asks of payment APIs; a bearer token is refused (401
    /// `token_not_bound`).
    #[serde(default)]
    pub certificate_bound: bool,
    /// Claim equality: the claim must equal the value (or contain it, when the claim is an array).
    /// A list of values means any of them.
    #[serde(default, deserialize_with = "unique_keys")]
    pub claims: BTreeMap<String, serde_json::Value>,
    /// CEL condition that must hold; when false the request is denied (403).
    pub when: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationConfig {
    /// CEL condition; when true, `require` is added to the rule's requirement.
    pub when: String,
    pub require: RequireConfig,
    /// `shadow`: when the condition holds, what the request would get with `require` added is
    /// recorded, and the request is decided without it.
    #[serde(default)]
    pub mode: ModeConfig,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DefaultAction {
    /// Requests no rule matches are denied (403, reason `no_matching_rule`).
    #[default]
    Deny,
    /// Requests no rule matches are allowed with any valid token.
    AllowAuthenticated,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Headers set on allowed requests: header name → principal field (`subject`, `issuer`,
    /// `issuer_id`, `tenant`, `client_id`, `acrs`, `acr`, `amr`, `scopes`, `roles`, `auth_time`,
    /// `rule`) or `claim:<name>`.
    #[serde(default = "default_identity_headers", deserialize_with = "unique_keys")]
    pub identity_headers: BTreeMap<String, String>,
    /// Remove the `Authorization` header before the request goes upstream (Envoy only).
    #[serde(default)]
    pub remove_authorization: bool,
    /// Envoy's `max_headers_count` for the listener (its default is 100). An allowed request whose
    /// headers plus the identity headers would exceed it is answered 431 instead of the 500 Envoy
    /// would send. 0 turns the check off.
    #[serde(default = "default_max_request_headers")]
    pub max_request_headers: usize,
    /// What path parameters (`/a;x=1/b`) mean to the upstream: `refuse` (the default: servers read
    /// them differently, so such a path is `invalid_path`) or `strip` (a servlet container, which
    /// cuts them from each segment; rules then match the path without them).
    #[serde(default)]
    pub path_parameters: PathParametersConfig,
    /// How the proxy routes a host sent with a port (`api.example.com:8443`): `routed` (the
    /// default, Envoy's own: its virtual hosts are picked with it, so host rules must agree on
    /// the host with and without it) or `ignored` (the proxy routes without it,
    /// `ignore_port_in_host_matching`, or one `*` virtual host in front of an upstream that
    /// ignores ports). A trailing dot is read as routed either way.
    #[serde(default)]
    pub host_port: HostPortConfig,
    /// What letter case means to the upstream's routes: `either` (the default: not known, so a
    /// path must pick the same rule read in lower case and read in its case), `insensitive`
    /// (ASP.NET Core, IIS: rules match in lower case) or `sensitive` (Go, Flask, Spring: rules
    /// match the path as sent against the glob as written).
    #[serde(default)]
    pub path_case: PathCaseConfig,
    /// What an extension on the path's last segment (`/payments/wire.json`) means to the
    /// upstream's routes: `either` (the default: not known, so the path must pick the same rule
    /// with it and without it; Rails and Spring MVC up to 5.2 serve `/payments/wire.json` from
    /// the `/payments/wire` route) or `exact` (the upstream routes the path as sent: Express, Go,
    /// Flask, ASP.NET Core, Spring MVC 5.3 and later by default).
    #[serde(default)]
    pub format_suffix: FormatSuffixConfig,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FormatSuffixConfig {
    #[default]
    Either,
    Exact,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PathCaseConfig {
    #[default]
    Either,
    Insensitive,
    Sensitive,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HostPortConfig {
    #[default]
    Routed,
    Ignored,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PathParametersConfig {
    #[default]
    Refuse,
    Strip,
}

fn default_max_request_headers() -> usize {
    100
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            identity_headers: default_identity_headers(),
            remove_authorization: false,
            max_request_headers: default_max_request_headers(),
            path_parameters: PathParametersConfig::default(),
            host_port: HostPortConfig::default(),
            path_case: PathCaseConfig::default(),
            format_suffix: FormatSuffixConfig::default(),
        }
    }
}

fn default_identity_headers() -> BTreeMap<String, String> {
    [
        ("x-stepgate-subject", "subject"),
        ("x-stepgate-tenant", "tenant"),
        ("x-stepgate-auth-contexts", "acrs"),
        ("x-stepgate-rule", "rule"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Tokens longer than this are refused before any parsing.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Verified tokens remembered (0 turns the cache off).
    #[serde(default = "default_token_cache_entries")]
    pub token_cache_entries: u64,
    /// Memory the verified-token cache may take, estimated per token (a size like 128MiB).
    #[serde(default = "default_token_cache_bytes")]
    pub token_cache_bytes: ByteSize,
    /// Longest a verified token is remembered (and never past its `exp`).
    #[serde(default = "default_token_cache_ttl")]
    pub token_cache_ttl: Seconds,
    /// Header entries a request may carry (pseudo-headers and repeats included); more is 431.
    #[serde(default = "default_max_header_count")]
    pub max_header_count: usize,
    /// Bytes of all header names and values together (a size like 96KiB); more is 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Values in a `Decide`'s attributes, at every depth; more is 413.
    #[serde(default = "default_max_attribute_values")]
    pub max_attribute_values: usize,
    /// Bytes of a `Decide`'s attribute keys and strings together (a size like 64KiB); more is
    /// 413.
    #[serde(default = "default_max_attribute_bytes")]
    pub max_attribute_bytes: ByteSize,
}

fn default_max_attribute_values() -> usize {
    crate::request::HeaderLimits::DEFAULT.max_attribute_values
}

fn default_max_attribute_bytes() -> ByteSize {
    ByteSize(crate::request::HeaderLimits::DEFAULT.max_attribute_bytes as u64)
}

fn default_max_header_count() -> usize {
    crate::request::HeaderLimits::DEFAULT.max_count
}

fn default_max_header_bytes() -> ByteSize {
    ByteSize(crate::request::HeaderLimits::DEFAULT.max_bytes as u64)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_token_bytes: default_max_token_bytes(),
            token_cache_entries: default_token_cache_entries(),
            token_cache_bytes: default_token_cache_bytes(),
            token_cache_ttl: default_token_cache_ttl(),
            max_header_count: default_max_header_count(),
            max_header_bytes: default_max_header_bytes(),
            max_attribute_values: default_max_attribute_values(),
            max_attribute_bytes: default_max_attribute_bytes(),
        }
    }
}

fn default_token_cache_entries() -> u64 {
    100_000
}

fn default_token_cache_bytes() -> ByteSize {
    ByteSize(128 * 1024 * 1024)
}

fn default_token_cache_ttl() -> Seconds {
    Seconds(3600)
}

fn default_max_token_bytes() -> usize {
    16 * 1024
}

/// `match: {…}` or `match: [{…}, {…}]`. Hand-written rather than `#[serde(untagged)]` so that an
/// error inside an entry keeps its message and field path.
#[derive(Debug, Clone)]
pub struct OneOrMany<T>(pub Vec<T>);

/// A map of the policy whose every key is given once. YAML readers differ on a repeated key
/// (serde's map takes the last, other tools and a reviewer's eye the first): two entries for
/// `x-stepgate-subject`, or for an auth context, would be one policy to stepgate and another to
/// whoever reads the file. Refused, with the key.
fn unique_keys<'de, D, V>(deserializer: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Visitor<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> de::Visitor<'de> for Visitor<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                if out.contains_key(&key) {
                    return Err(de::Error::custom(format!(
                        "{key:?} is given twice: readers of the file differ on which one holds"
                    )));
                }
                let value = map.next_value()?;
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_map(Visitor(PhantomData))
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Visitor<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a matcher or a list of matchers")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|one| OneOrMany(vec![one]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(SeqAccessDeserializer::new(seq)).map(OneOrMany)
            }
        }
        deserializer.deserialize_any(Visitor(PhantomData))
    }
}
