//! Policy file → [`Policy`]: every reference resolved and every value checked, with the field path
//! of the first problem. Key sets are not loaded here (that is I/O, done by `identity::keys`).

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    path::Path,
    sync::Arc,
    time::Duration,
};

use jsonwebtoken::Algorithm;

use super::{
    AdminAccess, AuthContext, ClaimRequirement, DefaultAction, Escalation, ExplainAccess,
    GrpcMatcher, HeaderSource, Matcher, PathCase, Policy, Requirement, Rule, Upstream,
    condition::{self, Condition},
    pattern::{HostPattern, PathGlob, Wildcard},
};
use crate::{
    config::{
        ConfigError,
        schema::{self, ChallengeStyleConfig, PolicyFile},
    },
    identity::{
        ChallengeStyle, EntraChallenge, Issuer, Issuers, KeepClaims, KeySource, TokenCache,
        issuer::{IssuerName, IssuerSettings, KeyTiming, SubjectClaim, Tenants, is_guid},
        keys::{self, DISCOVERY_SUFFIX},
        san::SanName,
    },
    request::{HeaderLimits, path::PathParameters},
};

type Result<T> = std::result::Result<T, ConfigError>;

/// The largest CA bundle read (`issuers[].ca_file`): Mozilla's whole root store is about 200 KiB.
const MAX_CA_BUNDLE_BYTES: u64 = 1024 * 1024;
/// The largest key file read (`records.subject_key_file`): a key is tens of bytes.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T> {
    Err(ConfigError::new(path, message))
}

/// Stack of the thread a policy is compiled on: CEL's parser recurses with large frames (about
/// 150 KiB per level of nesting in a debug build), and a reload runs on a runtime worker whose
/// stack is 2 MiB.
const COMPILE_STACK: usize = 64 * 1024 * 1024;

/// Compiles a parsed policy file. `base_dir` resolves relative `jwks_file` paths. Runs on a
/// thread of its own with a large stack ([`COMPILE_STACK`]); a panic while compiling is an error,
/// not a crash, so a reload keeps serving the running policy.
pub fn compile(file: &PolicyFile, base_dir: &Path) -> Result<Policy> {
    std::thread::scope(|scope| {
        let compiling = std::thread::Builder::new()
            .name("stepgate-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn_scoped(scope, || compile_here(file, base_dir));
        match compiling {
            Ok(thread) => thread.join().unwrap_or_else(|_| {
                err(
                    "",
                    "the policy could not be compiled (an internal error; see the log)",
                )
            }),
            // No thread to be had: compile here.
            Err(_) => compile_here(file, base_dir),
        }
    })
}

fn compile_here(file: &PolicyFile, base_dir: &Path) -> Result<Policy> {
    let cel = condition::environment();
    let issuers = compile_issuers(&file.issuers, &file.admin, base_dir)?;
    let auth_contexts = compile_auth_contexts(&file.auth_contexts)?;
    let mut rules = Vec::with_capacity(file.rules.len());
    let mut seen = HashSet::new();
    for (i, rule) in file.rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        let compiled = compile_rule(rule, &path, &cel, &issuers, &auth_contexts)?;
        if file.upstream.path_case != schema::PathCaseConfig::Sensitive {
            check_glob_letters(&compiled, rule, &path)?;
        }
        if !seen.insert(compiled.id.clone()) {
            return err(
                format!("{path}.id"),
                format!("duplicate rule id {:?}", rule.id),
            );
        }
        rules.push(compiled);
    }
    if rules.is_empty() {
        return err("rules", "at least one rule is required");
    }
    if file.limits.max_token_bytes == 0 || file.limits.max_token_bytes > 1024 * 1024 {
        return err("limits.max_token_bytes", "must be between 1 and 1048576");
    }
    if file.limits.token_cache_entries > 100_000_000 {
        return err(
            "limits.token_cache_entries",
            "must be at most 100000000 (about 1 KiB of memory each)",
        );
    }
    if file.limits.token_cache_bytes.0 < 1024 * 1024 && file.limits.token_cache_entries > 0 {
        return err(
            "limits.token_cache_bytes",
            "must be at least 1MiB (or turn the cache off with token_cache_entries: 0)",
        );
    }
    if file.limits.max_header_count == 0 {
        return err("limits.max_header_count", "must be at least 1");
    }
    if file.limits.max_header_bytes.0 < 1024 {
        return err("limits.max_header_bytes", "must be at least 1024");
    }
    if file.limits.max_attribute_values == 0 {
        return err("limits.max_attribute_values", "must be at least 1");
    }
    if file.limits.max_attribute_bytes.0 < 1024 {
        return err("limits.max_attribute_bytes", "must be at least 1024");
    }
    let mut upstream = compile_upstream(&file.upstream)?;
    // What the rules spell as it is: their path globs, and the literals of their conditions
    // that read the request (a path compared with `":search"`).
    let conditions = rules.iter().flat_map(Rule::conditions);
    upstream.spelled = crate::request::path::Spelled::of(
        rules
            .iter()
            .flat_map(|r| r.matchers.iter().flat_map(|m| m.paths.iter()))
            .map(super::pattern::PathGlob::spelled)
            .chain(conditions.flat_map(Condition::request_literals)),
    );
    let explain = compile_explain(&file.explain)?;
    let admin = compile_admin(&file.admin, &issuers, &cel, &auth_contexts)?;
    let risk = super::risk::compile_risk(&file.risk, &cel, &auth_contexts)?;
    super::risk::check_risk_reads(&rules, &risk)?;
    super::risk::check_acr_lists(&rules, &risk)?;
    let records = compile_records(&file.records, base_dir)?;
    let keep_claims = claims_read(&rules, &upstream);
    Ok(Policy {
        realm: check_quotable(&file.realm, "realm")?,
        issuers,
        auth_contexts,
        index: super::index::RuleIndex::new(&rules),
        rules,
        default: match file.default {
            schema::DefaultAction::Deny => DefaultAction::Deny,
            schema::DefaultAction::AllowAuthenticated => DefaultAction::AllowAuthenticated,
        },
        upstream,
        max_token_bytes: file.limits.max_token_bytes,
        header_limits: HeaderLimits {
            max_count: file.limits.max_header_count,
            max_bytes: usize::try_from(file.limits.max_header_bytes.0).unwrap_or(usize::MAX),
            max_attribute_values: file.limits.max_attribute_values,
            max_attribute_bytes: usize::try_from(file.limits.max_attribute_bytes.0)
                .unwrap_or(usize::MAX),
        },
        cel,
        explain,
        admin,
        risk,
        records,
        token_cache: TokenCache::new(
            file.limits.token_cache_entries,
            file.limits.token_cache_bytes.0,
            file.limits.token_cache_ttl.as_duration(),
            keep_claims,
        ),
    })
}

/// A list of client certificate names (compared exactly with a certificate's SANs): none empty or
/// padded with spaces, which would never match.
/// An allow-list of client certificate names, each typed by its text (`identity::san`).
fn compile_sans(sans: &[String], path: &str) -> Result<Vec<SanName>> {
    sans.iter()
        .enumerate()
        .map(|(i, san)| {
            SanName::from_entry(san).or_else(|e| {
                err(
                    format!("{path}[{i}]"),
                    format!("must be a subject alternative name: {e}"),
                )
            })
        })
        .collect()
}

fn compile_admin(
    config: &schema::AdminConfig,
    issuers: &Issuers,
    cel: &Arc<cel::Env>,
    declared: &BTreeMap<String, AuthContext>,
) -> Result<AdminAccess> {
    let client_sans = compile_sans(&config.client_sans, "admin.client_sans")?;
    for (i, id) in config.issuers.iter().enumerate() {
        let Some(issuer) = issuers.by_id(id) else {
            return err(
                format!("admin.issuers[{i}]"),
                format!("{id:?} is not an issuer id of this policy"),
            );
        };
        // An admin of any tenant it accepts could give itself the admin role (in Entra, a
        // customer tenant's administrator assigns a multi-tenant API's app roles in their own
        // tenant) and block or revoke anyone.
        let several = match &issuer.tenants {
            crate::identity::issuer::Tenants::NotApplicable => false,
            crate::identity::issuer::Tenants::Only(tenants) => tenants.len() > 1,
            crate::identity::issuer::Tenants::Any => true,
        };
        if several {
            return err(
                format!("admin.issuers[{i}]"),
                format!(
                    "{id:?} accepts tokens of several tenants, and an administrator of any of \
                     them could assign itself the admin role: name an issuer of your own tenant \
                     (its exact issuer URL, or `tenants:` with that one tenant)"
                ),
            );
        }
    }
    if config.roles.is_empty() != config.issuers.is_empty() {
        return err(
            "admin",
            "roles and issuers go together: the tokens of which issuers, carrying which roles",
        );
    }
    if config.roles.iter().any(|r| r.trim().is_empty()) {
        return err("admin.roles", "a role must not be empty");
    }
    if !config.audiences.is_empty() && config.issuers.is_empty() {
        return err(
            "admin.audiences",
            "audiences are those of admin tokens: name the admin issuers and roles too",
        );
    }
    for (i, audience) in config.audiences.iter().enumerate() {
        // A token verifies only with an audience its issuer accepts: one no admin issuer
        // accepts would refuse every admin token.
        let accepted = config.issuers.iter().any(|id| {
            issuers
                .by_id(id)
                .is_some_and(|issuer| issuer.audiences.iter().any(|a| a == audience))
        });
        if !accepted {
            return err(
                format!("admin.audiences[{i}]"),
                format!(
                    "{audience:?} is not among the audiences of any of admin.issuers: add it to \
                     the issuer's audiences, or no admin token would verify"
                ),
            );
        }
    }
    let rule = match &config.require {
        None => None,
        Some(_) if config.roles.is_empty() => {
            return err(
                "admin.require",
                "applies to admin tokens: name their issuers and roles (admin.issuers, admin.roles)",
            );
        }
        Some(require) => {
            // What a token shows, nothing of a request: no claim or condition (their claims are
            // not kept for the admin API).
            if !require.claims.is_empty() {
                return err("admin.require.claims", "not read for the admin API");
            }
            if require.when.is_some() {
                return err("admin.require.when", "not read for the admin API");
            }
            Some(Rule {
                id: "admin".into(),
                description: "the admin API".to_owned(),
                matchers: Vec::new(),
                issuers: config.issuers.clone(),
                allow_anonymous: false,
                require: compile_requirement(require, "admin.require", cel, declared)?,
                escalate: Vec::new(),
                shadow: false,
            })
        }
    };
    Ok(AdminAccess {
        client_sans,
        issuers: config.issuers.clone(),
        roles: config.roles.clone(),
        audiences: config.audiences.clone(),
        rule,
    })
}

fn compile_explain(config: &schema::ExplainConfig) -> Result<ExplainAccess> {
    if config.enabled && config.client_sans.is_empty() && !config.admin_listener {
        return err(
            "explain",
            "enabled, but for nobody: name the callers with client_sans (mutual TLS) or \
             admin_listener: true (--admin-listen)",
        );
    }
    Ok(ExplainAccess {
        enabled: config.enabled,
        client_sans: compile_sans(&config.client_sans, "explain.client_sans")?,
        admin_listener: config.admin_listener,
    })
}

/// The raw claims a verified token must keep for this policy: all of them when a CEL condition
/// reads `claims`, else those named by claim requirements and `claim:` identity headers.
fn claims_read(rules: &[Rule], upstream: &Upstream) -> KeepClaims {
    let requirements = || {
        rules.iter().flat_map(|rule| {
            std::iter::once(&rule.require).chain(rule.escalate.iter().map(|e| &e.require))
        })
    };
    if rules
        .iter()
        .flat_map(Rule::conditions)
        .any(Condition::reads_claims)
    {
        return KeepClaims::All;
    }
    let mut names: Vec<String> = requirements()
        .flat_map(|r| r.claims.iter().map(|c| c.claim.clone()))
        .chain(
            upstream
                .identity_headers
                .iter()
                .filter_map(|(_, source)| match source {
                    HeaderSource::Claim(claim) => Some(claim.clone()),
                    _ => None,
                }),
        )
        .collect();
    names.sort();
    names.dedup();
    KeepClaims::Named(names.into())
}

/// Values that end up inside a quoted `WWW-Authenticate` parameter may not break out of it.
fn check_quotable(value: &str, path: &str) -> Result<String> {
    if value
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return err(
            path,
            "must not contain quotes, backslashes or control characters",
        );
    }
    Ok(value.to_owned())
}

fn compile_issuers(
    configs: &[schema::IssuerConfig],
    admin: &schema::AdminConfig,
    base_dir: &Path,
) -> Result<Issuers> {
    if configs.is_empty() {
        return err("issuers", "at least one issuer is required");
    }
    let mut ids = HashSet::new();
    let mut iss_values = HashSet::new();
    let mut issuers = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let path = format!("issuers[{i}]");
        if !is_identifier(&c.id) {
            return err(
                format!("{path}.id"),
                format!("expected letters, digits, - or _, got {:?}", c.id),
            );
        }
        if !ids.insert(c.id.as_str()) {
            return err(
                format!("{path}.id"),
                format!("duplicate issuer id {:?}", c.id),
            );
        }
        let key_source = match (&c.jwks_uri, &c.jwks_file, &c.discovery_url) {
            (Some(uri), None, None) => {
                KeySource::Uri(check_https_url(uri, &format!("{path}.jwks_uri"))?)
            }
            (None, Some(file), None) => KeySource::File(base_dir.join(file)),
            (None, None, Some(url)) => {
                KeySource::Discovery(check_https_url(url, &format!("{path}.discovery_url"))?)
            }
            (None, None, None) => {
                return err(
                    &path,
                    "one of discovery_url, jwks_uri or jwks_file is required",
                );
            }
            _ => {
                return err(
                    &path,
                    "set only one of discovery_url, jwks_uri and jwks_file",
                );
            }
        };
        if c.issuer.is_empty() && !matches!(key_source, KeySource::Discovery(_)) {
            return err(
                format!("{path}.issuer"),
                "required unless discovery_url is set (then it is read from the discovery document)",
            );
        }
        if !c.issuer.is_empty() && !iss_values.insert(c.issuer.as_str()) {
            return err(
                format!("{path}.issuer"),
                format!("issuer {:?} is configured twice", c.issuer),
            );
        }
        // An issuer left to discovery is the discovery URL's own (OpenID Connect Discovery 4.3,
        // checked again against the document when it is read): it must not be another's.
        if let (KeySource::Discovery(url), true) = (&key_source, c.issuer.is_empty()) {
            let Some(implied) = keys::issuer_of_discovery_url(url) else {
                return err(
                    format!("{path}.issuer"),
                    format!(
                        "required: the discovery_url does not end with {DISCOVERY_SUFFIX:?}, so \
                         the document cannot name its own issuer (OpenID Connect Discovery 4.3)"
                    ),
                );
            };
            let same = |other: &str| other.trim_end_matches('/') == implied.trim_end_matches('/');
            let named_again = configs.iter().position(|o| {
                let other = match (&o.discovery_url, o.issuer.is_empty()) {
                    (Some(u), true) => keys::issuer_of_discovery_url(u),
                    (_, false) => Some(o.issuer.as_str()),
                    (None, true) => None,
                };
                !std::ptr::eq(o, c) && other.is_some_and(same)
            });
            if let Some(other) = named_again {
                return err(
                    format!("{path}.discovery_url"),
                    format!("its issuer is issuers[{other}]'s too"),
                );
            }
        }
        let tenants = compile_tenants(c, &path)?;
        if c.audiences.is_empty() || c.audiences.iter().any(String::is_empty) {
            return err(
                format!("{path}.audiences"),
                "list at least one non-empty audience",
            );
        }
        let mut algorithms = Vec::new();
        for (j, name) in c.algorithms.iter().enumerate() {
            algorithms.push(parse_algorithm(name, &format!("{path}.algorithms[{j}]"))?);
        }
        if algorithms.is_empty() {
            return err(format!("{path}.algorithms"), "list at least one algorithm");
        }
        let timing = compile_key_timing(&c.keys, &format!("{path}.keys"))?;
        if c.leeway.0 > 600 {
            return err(format!("{path}.leeway"), "must be at most 10m");
        }
        let entra = EntraChallenge {
            authorization_uri: check_quotable(
                &c.entra.authorization_uri,
                &format!("{path}.entra.authorization_uri"),
            )?,
            realm: check_quotable(&c.entra.realm, &format!("{path}.entra.realm"))?,
            client_id: c
                .entra
                .client_id
                .as_deref()
                .map(|id| check_quotable(id, &format!("{path}.entra.client_id")))
                .transpose()?,
        };
        let challenge = match c.challenge {
            ChallengeStyleConfig::Entra => ChallengeStyle::Entra,
            ChallengeStyleConfig::Rfc9470 => ChallengeStyle::Rfc9470,
            ChallengeStyleConfig::Deny => ChallengeStyle::Deny,
        };
        let mut trust = None;
        let http = match &c.ca_file {
            None => None,
            Some(_) if matches!(key_source, KeySource::File(_)) => {
                return err(
                    format!("{path}.ca_file"),
                    "only with jwks_uri or discovery_url (jwks_file reads no https)",
                );
            }
            Some(file) => {
                let at = format!("{path}.ca_file");
                let file = base_dir.join(file);
                // A regular file, and no bigger than a CA bundle is (a FIFO or a device would
                // stall or fill the reading thread).
                let pem =
                    crate::config::read_file_at_most(&file, MAX_CA_BUNDLE_BYTES).map_err(|e| {
                        ConfigError::new(&at, format!("cannot read {}: {e}", file.display()))
                    })?;
                let roots = keys::parse_ca_bundle(&pem)
                    .map_err(|e| ConfigError::new(&at, format!("{}: {e}", file.display())))?;
                trust = Some(<sha2::Sha256 as sha2::Digest>::digest(&pem).into());
                Some(keys::client_trusting_only(roots).map_err(|e| ConfigError::new(&at, e))?)
            }
        };
        issuers.push(Arc::new(Issuer::new(IssuerSettings {
            id: c.id.clone(),
            issuer: c.issuer.clone(),
            tenants,
            audiences: c.audiences.clone(),
            admin_audiences: if admin.issuers.contains(&c.id) {
                let ours = |a: &&String| c.audiences.contains(a);
                admin.audiences.iter().filter(ours).cloned().collect()
            } else {
                Vec::new()
            },
            algorithms,
            leeway: c.leeway.0,
            refuse_id_tokens: c.refuse_id_tokens,
            require_at_jwt: c.require_at_jwt,
            accept_bound_tokens: c.accept_bound_tokens,
            subject_claim: match c.subject_claim {
                crate::config::schema::SubjectClaimConfig::Sub => SubjectClaim::Sub,
                crate::config::schema::SubjectClaimConfig::Oid => SubjectClaim::Oid,
            },
            challenge,
            entra,
            key_source,
            timing,
            http,
            trust,
        })));
    }
    Ok(Issuers::new(issuers))
}

fn check_https_url(uri: &str, path: &str) -> Result<String> {
    let parsed =
        reqwest::Url::parse(uri).map_err(|e| ConfigError::new(path, format!("not a URL: {e}")))?;
    let loopback = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    match parsed.scheme() {
        "https" => Ok(uri.to_owned()),
        "http" if loopback => Ok(uri.to_owned()),
        _ => err(
            path,
            "must be an https URL (plain http is allowed for localhost only)",
        ),
    }
}

/// `{tenantid}` issuers need an explicit tenant policy; other issuers must not have one.
fn compile_tenants(c: &schema::IssuerConfig, path: &str) -> Result<Tenants> {
    let placeholders = c.issuer.matches(IssuerName::TENANT_PLACEHOLDER).count();
    if placeholders == 0 {
        if !c.tenants.is_empty() || c.any_tenant {
            return err(
                format!("{path}.tenants"),
                "tenants and any_tenant apply only to an issuer with {tenantid}",
            );
        }
        return Ok(Tenants::NotApplicable);
    }
    if placeholders > 1 {
        return err(format!("{path}.issuer"), "{tenantid} may appear once");
    }
    match (c.tenants.is_empty(), c.any_tenant) {
        (true, false) => err(
            format!("{path}.tenants"),
            "a {tenantid} issuer accepts tokens of many tenants: list them in tenants, or set any_tenant: true",
        ),
        (false, true) => err(
            format!("{path}.any_tenant"),
            "set tenants or any_tenant, not both",
        ),
        (true, true) => Ok(Tenants::Any),
        (false, false) => {
            let mut allowed = BTreeSet::new();
            for (i, tenant) in c.tenants.iter().enumerate() {
                if !is_guid(tenant) {
                    return err(
                        format!("{path}.tenants[{i}]"),
                        format!("a tenant id is a GUID, got {tenant:?}"),
                    );
                }
                allowed.insert(tenant.to_ascii_lowercase());
            }
            Ok(Tenants::Only(allowed))
        }
    }
}

fn compile_key_timing(k: &schema::KeysConfig, path: &str) -> Result<KeyTiming> {
    // Short intervals are allowed (tests, local identity providers); the defaults are the advice.
    if k.refresh.0 < 1 {
        return err(format!("{path}.refresh"), "must be at least 1s");
    }
    if k.min_refresh.0 < 1 || k.min_refresh > k.max_refresh {
        return err(
            format!("{path}.min_refresh"),
            "must be at least 1s and at most max_refresh",
        );
    }
    if k.retry.0 < 1 || k.retry > k.refresh {
        return err(
            format!("{path}.retry"),
            "must be at least 1s and at most refresh",
        );
    }
    if k.max_stale < k.refresh {
        return err(format!("{path}.max_stale"), "must be at least refresh");
    }
    if k.unknown_kid_cooldown.0 < 1 {
        return err(
            format!("{path}.unknown_kid_cooldown"),
            "must be at least 1s",
        );
    }
    if k.unknown_kid_wait.0 > Duration::from_secs(5) {
        return err(
            format!("{path}.unknown_kid_wait"),
            "must be at most 5s (Envoy's ext_authz timeout is usually far less)",
        );
    }
    Ok(KeyTiming {
        refresh: k.refresh.as_duration(),
        min_refresh: k.min_refresh.as_duration(),
        max_refresh: k.max_refresh.as_duration(),
        retry: k.retry.as_duration(),
        max_stale: k.max_stale.as_duration(),
        unknown_kid_cooldown: k.unknown_kid_cooldown.as_duration(),
        unknown_kid_wait: k.unknown_kid_wait.0,
    })
}

fn parse_algorithm(name: &str, path: &str) -> Result<Algorithm> {
    if name.eq_ignore_ascii_case("none") {
        return err(path, "\"none\" is never allowed");
    }
    let alg: Algorithm = name
        .parse()
        .map_err(|_| ConfigError::new(path, format!("unknown algorithm {name:?}")))?;
    if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return err(
            path,
            format!(
                "{name} is a shared-secret algorithm; stepgate verifies with published public keys only"
            ),
        );
    }
    Ok(alg)
}

/// Entra authentication context ids: `c1` … `c99`.
pub(crate) fn is_auth_context_id(id: &str) -> bool {
    let Some(n) = id.strip_prefix('c').or_else(|| id.strip_prefix('C')) else {
        return false;
    };
    !n.starts_with('0') && n.parse::<u8>().is_ok_and(|n| (1..=99).contains(&n))
}

fn compile_auth_contexts(
    configs: &BTreeMap<String, schema::AuthContextConfig>,
) -> Result<BTreeMap<String, AuthContext>> {
    let mut out = BTreeMap::new();
    for (id, c) in configs {
        if !is_auth_context_id(id) {
            return err(
                format!("auth_contexts.{id}"),
                "an authentication context id is c1 … c99",
            );
        }
        let id = id.to_ascii_lowercase();
        let claims_request = crate::challenge::entra_claims_request(&id);
        let context = AuthContext {
            id: id.clone(),
            description: c.description.clone(),
            max_age: c.max_age.map(|s| s.0),
            claims_base64: crate::challenge::encode_claims(&claims_request),
            claims_request,
        };
        if out.insert(id.clone(), context).is_some() {
            return err(
                format!("auth_contexts.{id}"),
                "declared twice (ids are case-insensitive)",
            );
        }
    }
    Ok(out)
}

fn compile_rule(
    rule: &schema::RuleConfig,
    path: &str,
    cel: &Arc<cel::Env>,
    issuers: &Issuers,
    auth_contexts: &BTreeMap<String, AuthContext>,
) -> Result<Rule> {
    if !is_identifier(&rule.id) {
        return err(
            format!("{path}.id"),
            format!("expected letters, digits, -, _ or ., got {:?}", rule.id),
        );
    }
    if rule.matchers.0.is_empty() {
        return err(format!("{path}.match"), "list at least one matcher");
    }
    // Sized to fit: four matchers' room for the usual one or two is 1.5 KiB more per rule.
    let mut matchers = Vec::with_capacity(rule.matchers.0.len());
    for (i, m) in rule.matchers.0.iter().enumerate() {
        let mpath = if rule.matchers.0.len() == 1 {
            format!("{path}.match")
        } else {
            format!("{path}.match[{i}]")
        };
        matchers.push(compile_matcher(m, &mpath, cel)?);
    }
    for (i, id) in rule.issuers.iter().enumerate() {
        if issuers.by_id(id).is_none() {
            return err(
                format!("{path}.issuers[{i}]"),
                format!("no issuer has id {id:?}"),
            );
        }
    }
    let require = compile_requirement(
        &rule.require,
        &format!("{path}.require"),
        cel,
        auth_contexts,
    )?;
    if rule.allow_anonymous && (!require.is_empty() || !rule.escalate.is_empty()) {
        return err(
            format!("{path}.allow_anonymous"),
            "a rule that allows anonymous access cannot also require or escalate anything",
        );
    }
    let mut escalate = Vec::new();
    for (i, e) in rule.escalate.iter().enumerate() {
        let epath = format!("{path}.escalate[{i}]");
        let when = Condition::compile(cel, &e.when)
            .map_err(|m| ConfigError::new(format!("{epath}.when"), m))?;
        let require =
            compile_requirement(&e.require, &format!("{epath}.require"), cel, auth_contexts)?;
        if require.is_empty() {
            return err(
                format!("{epath}.require"),
                "an escalation must require something",
            );
        }
        escalate.push(Escalation {
            when,
            require,
            shadow: e.mode == schema::ModeConfig::Shadow,
        });
    }
    Ok(Rule {
        id: Arc::from(rule.id.as_str()),
        description: rule.description.clone(),
        matchers,
        issuers: rule.issuers.clone(),
        allow_anonymous: rule.allow_anonymous,
        require,
        escalate,
        shadow: rule.mode == schema::ModeConfig::Shadow,
    })
}

/// Under `path_case: insensitive` or `either`, rules compare paths in ASCII lower case, while
/// servers that ignore case fold other letters too (ASP.NET Core reads `/DONNÉES/x` as
/// `/données/x`): a glob with such a letter would miss paths its upstream route serves.
fn check_glob_letters(compiled: &Rule, rule: &schema::RuleConfig, path: &str) -> Result<()> {
    for (i, (matcher, config)) in compiled.matchers.iter().zip(&rule.matchers.0).enumerate() {
        let Some(k) = matcher.paths.iter().position(PathGlob::has_cased_non_ascii) else {
            continue;
        };
        let mpath = if rule.matchers.0.len() == 1 {
            format!("{path}.match")
        } else {
            format!("{path}.match[{i}]")
        };
        let field = match (&config.path, k) {
            (Some(_), 0) => format!("{mpath}.path"),
            (Some(_), k) => format!("{mpath}.paths[{}]", k - 1),
            (None, k) => format!("{mpath}.paths[{k}]"),
        };
        return err(
            field,
            format!(
                "{:?} has a letter outside ASCII, which paths are not compared in without case; \
                 match it with a wildcard segment and a `when` condition, or set \
                 upstream.path_case: sensitive if the upstream routes in case (docs/policy.md)",
                matcher.paths[k].as_str()
            ),
        );
    }
    Ok(())
}

fn compile_matcher(m: &schema::MatcherConfig, path: &str, cel: &Arc<cel::Env>) -> Result<Matcher> {
    let mut methods = Vec::new();
    for (i, method) in m.methods.iter().enumerate() {
        if method.is_empty() || !method.chars().all(|c| c.is_ascii_alphabetic()) {
            return err(
                format!("{path}.methods[{i}]"),
                format!("not an HTTP method: {method:?}"),
            );
        }
        methods.push(method.to_ascii_uppercase());
    }
    // A HEAD is a GET without the body (RFC 9110 9.3.2), and servers answer it with their GET
    // handlers: a rule on GET covers it, or a HEAD would pass under a weaker rule.
    if methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
        methods.push("HEAD".to_owned());
    }
    let hosts: Vec<HostPattern> = m
        .host
        .iter()
        .chain(&m.hosts)
        .map(|h| HostPattern::new(&h.to_ascii_lowercase()))
        .collect();
    let mut paths = Vec::new();
    for (i, glob) in m.path.iter().chain(&m.paths).enumerate() {
        let field = if m.path.is_some() && i == 0 {
            format!("{path}.path")
        } else {
            format!("{path}.paths[{}]", i - usize::from(m.path.is_some()))
        };
        paths.push(PathGlob::new(glob).map_err(|msg| ConfigError::new(field, msg))?);
    }
    let grpc = match &m.grpc {
        None => None,
        Some(g) => {
            if g.service.is_empty() || g.service.contains('/') {
                return err(
                    format!("{path}.grpc.service"),
                    "expected a full service name like pkg.Service",
                );
            }
            if g.method
                .as_deref()
                .is_some_and(|m| m.is_empty() || m.contains('/'))
            {
                return err(
                    format!("{path}.grpc.method"),
                    "expected a method name like Transfer",
                );
            }
            Some(Box::new(GrpcMatcher {
                service: Wildcard::ignoring_case(&g.service),
                method: g.method.as_deref().map(Wildcard::ignoring_case),
            }))
        }
    };
    if let Some(op) = &m.operation {
        if op.is_empty() {
            return err(format!("{path}.operation"), "must not be empty");
        }
        if !crate::request::is_valid_operation(op) {
            return err(
                format!("{path}.operation"),
                format!(
                    "must be at most {} bytes, without control characters (a request's operation \
                     past that is refused)",
                    crate::request::MAX_OPERATION_BYTES
                ),
            );
        }
    }
    let when = m
        .when
        .as_deref()
        .map(|w| {
            Condition::compile(cel, w)
                .map(Box::new)
                .map_err(|msg| ConfigError::new(format!("{path}.when"), msg))
        })
        .transpose()?;
    Ok(Matcher {
        operation: m.operation.as_deref().map(Wildcard::new),
        methods,
        hosts,
        paths,
        grpc,
        when,
    })
}

pub(super) fn compile_requirement(
    r: &schema::RequireConfig,
    path: &str,
    cel: &Arc<cel::Env>,
    declared: &BTreeMap<String, AuthContext>,
) -> Result<Requirement> {
    if r.authenticated == Some(false) {
        return err(
            format!("{path}.authenticated"),
            "a valid token is always required; use allow_anonymous: true on the rule for public routes",
        );
    }
    let mut auth_contexts = Vec::new();
    for (i, id) in r.auth_contexts.iter().enumerate() {
        let field = format!("{path}.auth_contexts[{i}]");
        if !is_auth_context_id(id) {
            return err(
                field,
                format!("an authentication context id is c1 … c99, got {id:?}"),
            );
        }
        let id = id.to_ascii_lowercase();
        if !declared.contains_key(&id) {
            return err(field, format!("{id} is not declared under auth_contexts"));
        }
        if !auth_contexts.contains(&id) {
            auth_contexts.push(id);
        }
    }
    // Scopes and `acr` values are written into challenges (`scope="…"`, `acr_values="…"`, each a
    // space-separated list of RFC 6750 scope-tokens), `amr` values into messages: printable
    // ASCII without spaces, quotes or backslashes. A role is one claim value, spaces and all
    // (`Order Admin`), never written into a header but the scrubbed description.
    for (field, values) in [("scopes", &r.scopes), ("acr", &r.acr), ("amr", &r.amr)] {
        for (i, v) in values.iter().enumerate() {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            {
                return err(
                    format!("{path}.{field}[{i}]"),
                    format!(
                        "must be a non-empty value of printable ASCII without spaces, quotes or \
                         backslashes, got {v:?}"
                    ),
                );
            }
        }
    }
    for (i, v) in r.roles.iter().enumerate() {
        if v.trim().is_empty()
            || v.trim() != v
            || v.chars().any(|c| c.is_control() || c == '"' || c == '\\')
        {
            return err(
                format!("{path}.roles[{i}]"),
                format!(
                    "must be a non-empty role without surrounding spaces, quotes, backslashes or \
                     control characters, got {v:?}"
                ),
            );
        }
    }
    if r.max_age == Some(crate::config::duration::Seconds(0)) {
        return err(format!("{path}.max_age"), "must be at least 1s");
    }
    let mut claims = Vec::new();
    for (name, expected) in &r.claims {
        let any_of = match expected {
            serde_json::Value::Array(values) => values.clone(),
            serde_json::Value::Object(_) | serde_json::Value::Null => {
                return err(
                    format!("{path}.claims.{name}"),
                    "expected a string, number, boolean or a list of them",
                );
            }
            scalar => vec![scalar.clone()],
        };
        if any_of.is_empty()
            || any_of
                .iter()
                .any(|v| v.is_object() || v.is_array() || v.is_null())
        {
            return err(
                format!("{path}.claims.{name}"),
                "expected a string, number, boolean or a list of them",
            );
        }
        claims.push(ClaimRequirement {
            claim: name.clone(),
            any_of,
        });
    }
    let when = r
        .when
        .as_deref()
        .map(|w| {
            Condition::compile(cel, w)
                .map(Box::new)
                .map_err(|msg| ConfigError::new(format!("{path}.when"), msg))
        })
        .transpose()?;
    // A context's own max_age applies wherever the context is required.
    let context_max_age = auth_contexts
        .iter()
        .filter_map(|id| declared[id].max_age)
        .min();
    let max_age = match (r.max_age.map(|s| s.0), context_max_age) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(Requirement {
        scopes: r.scopes.clone(),
        roles: r.roles.clone(),
        claims,
        when,
        auth_contexts,
        acr: r.acr.clone(),
        amr: r.amr.clone(),
        max_age,
        certificate_bound: r.certificate_bound,
    })
}

fn compile_upstream(u: &schema::UpstreamConfig) -> Result<Upstream> {
    let mut identity_headers = Vec::new();
    for (name, source) in &u.identity_headers {
        let path = format!("upstream.identity_headers.{name}");
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_name {
            return err(path, "header names are lower-case letters, digits and -");
        }
        if matches!(
            name.as_str(),
            "authorization" | "host" | "connection" | "te" | "transfer-encoding" | "content-length"
        ) {
            return err(path, format!("{name} cannot carry identity"));
        }
        let source = match source.as_str() {
            "subject" => HeaderSource::Subject,
            "issuer" => HeaderSource::Issuer,
            "issuer_id" => HeaderSource::IssuerId,
            "tenant" => HeaderSource::Tenant,
            "client_id" => HeaderSource::ClientId,
            "acrs" => HeaderSource::Acrs,
            "acr" => HeaderSource::Acr,
            "amr" => HeaderSource::Amr,
            "scopes" => HeaderSource::Scopes,
            "roles" => HeaderSource::Roles,
            "auth_time" => HeaderSource::AuthTime,
            "rule" => HeaderSource::Rule,
            other => match other.strip_prefix("claim:") {
                Some(claim) if !claim.is_empty() => HeaderSource::Claim(claim.to_owned()),
                _ => {
                    return err(
                        path,
                        format!(
                            "unknown source {other:?}; expected subject, issuer, issuer_id, tenant, client_id, \
                             acrs, acr, amr, scopes, roles, auth_time, rule or claim:<name>"
                        ),
                    );
                }
            },
        };
        identity_headers.push((Arc::from(name.as_str()), source));
    }
    Ok(Upstream {
        identity_headers,
        remove_authorization: u.remove_authorization,
        max_request_headers: u.max_request_headers,
        path_parameters: match u.path_parameters {
            schema::PathParametersConfig::Refuse => PathParameters::Refuse,
            schema::PathParametersConfig::Strip => PathParameters::Strip,
        },
        host_port_routed: u.host_port == schema::HostPortConfig::Routed,
        path_case: match u.path_case {
            schema::PathCaseConfig::Either => PathCase::Either,
            schema::PathCaseConfig::Insensitive => PathCase::Insensitive,
            schema::PathCaseConfig::Sensitive => PathCase::Sensitive,
        },
        format_suffix_either: u.format_suffix == schema::FormatSuffixConfig::Either,
        spelled: crate::request::path::Spelled::default(),
    })
}

fn compile_records(
    c: &schema::RecordsConfig,
    base_dir: &Path,
) -> Result<crate::telemetry::records::RecordsPolicy> {
    if !(0.0..=1.0).contains(&c.allow_sample) {
        return err("records.allow_sample", "must be between 0 and 1");
    }
    if c.max_bytes.0 < 1024 * 1024 {
        return err("records.max_bytes", "must be at least 1MiB");
    }
    if c.keep > 1000 {
        return err("records.keep", "must be at most 1000");
    }
    let path = match c.path.trim() {
        "" => return err("records.path", "a file, or - for stdout"),
        "-" => None,
        p => Some(base_dir.join(p)),
    };
    let subject_key = match &c.subject_key_file {
        None => None,
        Some(file) => {
            let key = crate::config::read_file_at_most(&base_dir.join(file), MAX_KEY_FILE_BYTES)
                .map_err(|e| {
                    ConfigError::new(
                        "records.subject_key_file",
                        format!("cannot read {file}: {e}"),
                    )
                })?;
            let key = key.trim_ascii().to_vec();
            if key.len() < 16 {
                return err(
                    "records.subject_key_file",
                    "the key must be at least 16 bytes (e.g. `openssl rand -hex 32`)",
                );
            }
            Some(crate::telemetry::records::SubjectKey::new(&key))
        }
    };
    Ok(crate::telemetry::records::RecordsPolicy {
        enabled: c.enabled,
        path,
        max_bytes: c.max_bytes.0,
        keep: c.keep,
        allow_sample_ppm: (c.allow_sample * 1_000_000.0).round() as u32,
        unverified_per_second: c.unverified_per_second,
        attributes: c.attributes.clone(),
        subject_key,
    })
}

fn is_identifier(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    const BASE: &str = r#"
issuers:
  - id: demo
    issuer: https://idp.example
    jwks_file: keys.json
    audiences: [api://x]
auth_contexts:
  c1: { description: MFA }
  c2: { description: Compliant device, max_age: 10m }
rules:
  - id: wire
    match: { operation: payments.wire_transfer }
    require: { auth_contexts: [c1, c2], max_age: 15m }
"#;

    fn compile_text(text: &str) -> Result<Policy> {
        compile(&config::parse(text)?, Path::new("/etc/stepgate"))
    }

    #[test]
    fn context_max_age_tightens_the_rule() {
        let policy = compile_text(BASE).unwrap();
        assert_eq!(policy.rules[0].require.max_age, Some(600));
        assert_eq!(
            policy.issuers.by_id("demo").unwrap().key_source,
            KeySource::File("/etc/stepgate/keys.json".into())
        );
    }

    #[test]
    fn undeclared_auth_context_is_refused_with_path() {
        let e = compile_text(&BASE.replace("[c1, c2]", "[c1, c7]"))
            .err()
            .unwrap();
        assert_eq!(e.path, "rules[0].require.auth_contexts[1]");
        let e = compile_text(&BASE.replace("[c1, c2]", "[c100]"))
            .err()
            .unwrap();
        assert!(e.message.contains("c1 … c99"), "{e}");
    }

    #[test]
    fn an_issuer_left_to_discovery_must_be_the_discovery_urls_own_and_no_others() {
        let discovered = |url: &str| {
            BASE.replace(
                "    issuer: https://idp.example\n    jwks_file: keys.json\n",
                &format!("    discovery_url: {url}\n"),
            )
        };
        let own = "https://login.example/tenant-a/.well-known/openid-configuration";
        assert!(compile_text(&discovered(own)).is_ok());
        let e = compile_text(&discovered("https://login.example/openid"))
            .expect_err("a discovery_url OpenID Connect Discovery would not name");
        assert_eq!(e.path, "issuers[0].issuer", "{e}");
        assert!(e.message.contains("4.3"), "{e}");
        // The same issuer twice: stated by one, left to discovery by another (a trailing `/`
        // makes no difference to who answers there).
        let twice = discovered(own).replace(
            "\nauth_contexts:",
            "\n  - id: again\n    issuer: https://login.example/tenant-a/\n    \
             jwks_file: keys.json\n    audiences: [api://x]\nauth_contexts:",
        );
        let e = compile_text(&twice).expect_err("one issuer twice");
        assert_eq!(e.path, "issuers[0].discovery_url", "{e}");
        assert!(e.message.contains("issuers[1]"), "{e}");
    }

    #[test]
    fn dangerous_algorithms_are_refused() {
        let text = BASE.replace(
            "audiences: [api://x]",
            "audiences: [api://x]\n    algorithms: [RS256, HS256]",
        );
        let e = compile_text(&text).err().unwrap();
        assert_eq!(e.path, "issuers[0].algorithms[1]");
        let e = compile_text(&text.replace("HS256", "none")).err().unwrap();
        assert!(e.message.contains("never allowed"));
    }

    #[test]
    fn an_operation_no_request_could_carry_is_refused() {
        let long = "a".repeat(crate::request::MAX_OPERATION_BYTES + 1);
        for operation in [long.as_str(), "\"pay\\tments\""] {
            let e = compile_text(&BASE.replace("payments.wire_transfer", operation))
                .err()
                .unwrap_or_else(|| panic!("{operation:?} was accepted"));
            assert_eq!(e.path, "rules[0].match.operation", "{e}");
        }
        let longest = "a".repeat(crate::request::MAX_OPERATION_BYTES);
        compile_text(&BASE.replace("payments.wire_transfer", &longest)).unwrap();
    }

    #[test]
    fn bad_cel_is_refused_at_load() {
        let text = format!(
            "{BASE}    escalate:\n      - when: 'request.attributes.amount >'\n        require: {{ auth_contexts: [c2] }}\n"
        );
        let e = compile_text(&text).err().unwrap();
        assert_eq!(e.path, "rules[0].escalate[0].when");
    }

    #[test]
    fn attribute_limits_are_read_and_checked() {
        let with = |limits: &str| format!("{BASE}limits: {{ {limits} }}\n");
        let policy = compile_text(&with("max_attribute_values: 50, max_attribute_bytes: 2KiB"))
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(policy.header_limits.max_attribute_values, 50);
        assert_eq!(policy.header_limits.max_attribute_bytes, 2048);
        for (limits, path) in [
            ("max_attribute_values: 0", "limits.max_attribute_values"),
            ("max_attribute_bytes: 100", "limits.max_attribute_bytes"),
        ] {
            assert_eq!(compile_text(&with(limits)).err().unwrap().path, path);
        }
    }

    #[test]
    fn plain_http_jwks_only_for_localhost() {
        let text = BASE.replace("jwks_file: keys.json", "jwks_uri: http://idp.example/keys");
        assert_eq!(
            compile_text(&text).err().unwrap().path,
            "issuers[0].jwks_uri"
        );
        assert!(
            compile_text(
                &BASE.replace("jwks_file: keys.json", "jwks_uri: http://127.0.0.1:9/keys")
            )
            .is_ok()
        );
    }

    #[test]
    fn auth_context_ids_are_c1_to_c99() {
        for ok in ["c1", "c25", "c99", "C7"] {
            assert!(is_auth_context_id(ok), "{ok}");
        }
        for bad in ["c0", "c100", "c01", "cp1", "1", "c", "c-1"] {
            assert!(!is_auth_context_id(bad), "{bad}");
        }
    }

    #[test]
    fn anonymous_rules_cannot_require() {
        let text = BASE.replace("    require:", "    allow_anonymous: true\n    require:");
        assert_eq!(
            compile_text(&text).err().unwrap().path,
            "rules[0].allow_anonymous"
        );
    }
}
