//! `stepgate check`: validate a policy and print what was compiled.

use std::{path::PathBuf, process::ExitCode};

use stepgate::risk::signals::{Action, KeyKind, StoreFailure, StoreSpec};
use stepgate::{
    identity::{
        ChallengeStyle, KeySource,
        issuer::{SubjectClaim, Tenants},
        jwks::KeySet,
        keys::issuer_of_discovery_url,
    },
    policy::{
        DefaultAction, Matcher, PathCase, Policy, Requirement, condition::Condition,
        pattern::PathGlob,
    },
    request::path::without_extension,
};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Policy file (YAML).
    #[arg(long, short, env = "STEPGATE_CONFIG")]
    config: PathBuf,
}

pub fn run(args: CheckArgs) -> ExitCode {
    let policy = match super::load_policy(&args.config) {
        Ok(p) => p,
        Err(err) => return super::config_error(&args.config, &err),
    };
    // Local key files are part of the configuration: check them too.
    for issuer in policy.issuers.iter() {
        if let KeySource::File(path) = &issuer.key_source {
            // Read as serving reads it: a regular file of at most the size it accepts.
            let problem = match stepgate::config::read_file_at_most(
                path,
                stepgate::identity::keys::MAX_JWKS_FILE_BYTES,
            ) {
                Err(e) => Some(format!("cannot read {}: {e}", path.display())),
                Ok(bytes) => match KeySet::parse(&bytes) {
                    Err(e) => Some(format!("{}: {e}", path.display())),
                    Ok((set, _)) if set.is_empty() => {
                        Some(format!("{}: no usable signing key", path.display()))
                    }
                    Ok(_) => None,
                },
            };
            if let Some(problem) = problem {
                eprintln!(
                    "stepgate: invalid policy {}: issuers.{}.jwks_file: {problem}",
                    args.config.display(),
                    issuer.id
                );
                return ExitCode::from(2);
            }
        }
    }
    super::print_stdout(&describe(&policy));
    ExitCode::SUCCESS
}

fn describe(policy: &Policy) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "policy OK: {} issuer(s), {} rule(s), default {}",
        policy.issuers.iter().count(),
        policy.rules.len(),
        match policy.default {
            DefaultAction::Deny => "deny",
            DefaultAction::AllowAuthenticated => "allow_authenticated",
        }
    ));
    line("issuers:".into());
    for i in policy.issuers.iter() {
        let keys = match &i.key_source {
            KeySource::File(p) => format!("jwks_file {}", p.display()),
            // Its output lands in CI logs: a credential in a URL is masked, as in the log.
            KeySource::Uri(u) => format!("jwks_uri {}", stepgate::telemetry::url_shown(u)),
            KeySource::Discovery(u) => format!("discovery {}", stepgate::telemetry::url_shown(u)),
        };
        let keys = match &i.tenants {
            Tenants::NotApplicable => keys,
            Tenants::Any => format!("{keys} tenants=any"),
            Tenants::Only(t) => format!(
                "{keys} tenants={}",
                t.iter().cloned().collect::<Vec<_>>().join(",")
            ),
        };
        let keys = if i.require_at_jwt {
            format!("{keys} typ=at+jwt")
        } else {
            keys
        };
        let algs: Vec<String> = i.algorithms.iter().map(|a| format!("{a:?}")).collect();
        // An issuer left to discovery is its discovery URL's own (checked when it is read).
        let iss = match (&i.key_source, i.issuer.is_empty()) {
            (KeySource::Discovery(url), true) => format!(
                "{} (from discovery)",
                issuer_of_discovery_url(url).unwrap_or(url)
            ),
            _ => i.issuer.clone(),
        };
        line(format!(
            "  {:<12} {iss} aud={} alg={} challenge={} subject={} leeway={}s {keys}",
            i.id,
            i.audiences.join(","),
            algs.join(","),
            i.challenge.as_str(),
            i.subject_claim.name(),
            i.leeway
        ));
    }
    if !policy.auth_contexts.is_empty() {
        line("auth contexts:".into());
        for c in policy.auth_contexts.values() {
            let age = c
                .max_age
                .map(|s| format!(" (max_age {s}s)"))
                .unwrap_or_default();
            line(format!("  {:<4} {}{age}", c.id, c.description));
        }
    }
    line("rules (first match wins):".into());
    for (n, r) in policy.rules.iter().enumerate() {
        let mode = if r.shadow {
            " (shadow: recorded, not enforced)"
        } else {
            ""
        };
        line(format!("  {}. {}{mode}", n + 1, r.id));
        for m in &r.matchers {
            line(format!("     match   {}", matcher(m)));
        }
        if !r.issuers.is_empty() {
            line(format!("     issuers {}", r.issuers.join(", ")));
        }
        if r.allow_anonymous {
            line("     allow   anonymous".into());
        } else {
            line(format!(
                "     require valid token{}",
                requirement(&r.require)
            ));
        }
        for e in &r.escalate {
            line(format!(
                "     escalate{} when {} → also{}",
                if e.shadow { " (shadow)" } else { "" },
                e.when.source,
                requirement(&e.require).trim_start_matches(',')
            ));
        }
    }
    line(format!("rule index: {}", policy.index.shape()));
    if let Some(refused) = spelled_refusals(&policy.upstream.spelled) {
        line(refused);
    }
    // Each kind of warning: a line saying how many and why, then one line each.
    let mut warn = |found: Vec<String>, what: &str| {
        if !found.is_empty() {
            line(format!("warning: {} {what}:", found.len()));
            for warning in found {
                line(format!("  {warning}"));
            }
        }
    };
    warn(
        unreachable_matchers(policy),
        "matcher(s) no request reaches (first match wins)",
    );
    if policy.upstream.path_case == PathCase::Either {
        warn(
            upper_case_globs(policy),
            "path glob(s) have upper-case letters while upstream.path_case is either: a request in another case is refused (ambiguous_path); set path_case to how the upstream routes (docs/policy.md)",
        );
    }
    if policy.upstream.format_suffix_either {
        warn(
            extension_globs(policy),
            "path glob(s) name an extension while upstream.format_suffix is either: a path they match is also read without its extension, as Rails and Spring MVC up to 5.2 route it, and refused (ambiguous_path) when that picks another rule; set format_suffix: exact if the upstream routes the path as sent, or match both (/a and /a.*) (docs/policy.md)",
        );
    }
    warn(
        policy
            .rules
            .iter()
            .enumerate()
            .flat_map(|(n, rule)| {
                rule.matchers.iter().enumerate().filter_map(move |(k, m)| {
                    let takes = |x: &str| m.methods.iter().any(|method| method == x);
                    (takes("HEAD") && !takes("GET"))
                        .then(|| format!("rule {}. {} match {}", n + 1, rule.id, k + 1))
                })
            })
            .collect(),
        "matcher(s) take HEAD and not GET: most servers answer a HEAD with their GET handler, so a HEAD is decided as a GET too and the stricter answer stands, and one that two rules take as a HEAD and as a GET, one asking a step-up, is refused (ambiguous_path) unless both allow it; match GET, which takes HEAD (docs/policy.md)",
    );
    warn(
        entra_issuers_requiring_at_jwt(policy),
        "issuer(s) look like Entra ID but set require_at_jwt: Entra types its access tokens JWT, never at+jwt, so every token would be refused (token_type_invalid)",
    );
    warn(
        entra_issuers_without_contexts(policy),
        "issuer(s) look like Entra ID but are not challenge: entra, so their tokens' acrs claim is not read and no rule's auth_contexts can be met with them (docs/policy.md)",
    );
    warn(
        entra_issuers_with_pairwise_subjects(policy),
        "issuer(s) look like Entra ID and name the subject by sub, which Entra makes pairwise (another for each client application a user comes through), while a key: subject risk signal counts subjects: a user spreading over two applications is counted as two; set subject_claim: oid (docs/policy.md)",
    );
    warn(
        (!policy.admin.roles.is_empty() && policy.admin.audiences.is_empty())
            .then(|| {
                "admin: set admin.audiences to the admin API's own audience (docs/admin.md)"
                    .to_owned()
            })
            .into_iter()
            .collect(),
        "admin setting(s) let any token of an admin issuer with the role call the admin API, including the protected API's own tokens, which its upstreams and Decide callers see",
    );
    if policy.records.enabled || !policy.records.attributes.is_empty() {
        warn(
            unrecorded_attributes(policy),
            "condition(s) read Decide attributes that decision records do not keep (records.attributes): stepgate replay decides them as if the attribute were missing",
        );
    }
    warn(
        policy
            .issuers
            .iter()
            .filter(|issuer| {
                !issuer.admin_audiences.is_empty()
                    && issuer
                        .audiences
                        .iter()
                        .all(|a| issuer.admin_audiences.contains(a))
            })
            .map(|issuer| format!("issuer {} ({})", issuer.id, issuer.issuer))
            .collect(),
        "issuer(s) have no audience but admin.audiences: Check and Decide refuse every token of theirs as meant for the admin API (right for an issuer of operators only; otherwise give the admin API an audience of its own)",
    );
    warn(
        policy
            .risk
            .signals
            .iter()
            .filter(|s| s.key == KeyKind::Source && matches!(s.action, Action::Block { .. }))
            .map(|s| format!("risk signal {}", s.name))
            .collect(),
        "risk signal(s) block by source address: the address Envoy names is its connection's, a load balancer's for every client unless it sends the PROXY protocol, and one client tripping the signal would then block everyone (docs/risk.md)",
    );
    warn(
        policy
            .risk
            .signals
            .iter()
            .filter(|s| {
                matches!(s.key, KeyKind::Tenant | KeyKind::ClientId)
                    && matches!(s.action, Action::Block { .. })
            })
            .map(|s| format!("risk signal {} (key: {})", s.name, s.key.as_str()))
            .collect(),
        "risk signal(s) block a whole tenant or client application: one user tripping the signal blocks every user of it (docs/risk.md)",
    );
    warn(
        policy
            .upstream
            .identity_headers
            .iter()
            .filter(|(name, _)| !name.starts_with("x-stepgate-"))
            .map(|(name, _)| format!("identity header {name}"))
            .collect(),
        "identity header(s) are not named x-stepgate-*: the example Envoy configs remove a client's x-stepgate-* headers before ext_authz, so that none reaches the upstream where stepgate does not decide (a route with ext_authz off, failure_mode_allow); add these names to that filter (docs/envoy-and-istio.md)",
    );
    if policy.upstream.spelled.spells_space() {
        warn(
            globs_where(policy, |glob| glob.spelled().contains('+')),
            "path glob(s) spell a + while the policy spells a space (in a glob, or in a string literal of a condition reading the request): a + in a request path is refused (invalid_path), since some upstreams read it as a space, and so is its escape %2B, so no request reaches these globs through stepgate; rename the route with a +, or drop the space (docs/hostile-input.md, \"Paths\")",
        );
    }
    warn(
        path_case_mixups(policy),
        "condition(s) compare request.path with upper-case letters (rules also read the path in lower case; docs/policy.md, \"Two readings of a request\")",
    );
    let risk = &policy.risk;
    if !risk.signals.is_empty() || risk.store != StoreSpec::Memory {
        line(format!(
            "risk (store {}, on_store_failure {}, at most {} keys per signal):",
            risk.store.redacted(),
            match risk.on_store_failure {
                StoreFailure::KeepLast => "keep_last",
                StoreFailure::FailClosed => "fail_closed",
            },
            risk.max_keys
        ));
        for s in &risk.signals {
            let action = match &s.action {
                Action::Log => "log".to_owned(),
                Action::StepUp(r) => format!("step_up →{}", requirement(r).trim_start_matches(',')),
                Action::Block { seconds } => format!("block for {seconds}s"),
            };
            let grouped = match s.key {
                KeyKind::Source => format!(" (/{} IPv4, /{} IPv6)", s.ipv4_prefix, s.ipv6_prefix),
                _ => String::new(),
            };
            line(format!(
                "  {:<20} {} per {}{grouped} over {}s, at {}: {action}",
                s.name,
                s.event.as_str(),
                s.key.as_str(),
                s.window_seconds,
                s.threshold
            ));
        }
    }
    out
}

/// The matchers an enforced rule above takes every request of: first match wins, so they never
/// decide anything. Most often a `HEAD` rule below a `GET` one (a `GET` matcher takes `HEAD`
/// too), or a narrow path below a broader rule. Said per matcher, naming the rule that takes its
/// requests. Only what can be told from the patterns as written is found: a matcher covered by
/// several rules together, or by a glob that is not `/**` or `*`, is not.
fn unreachable_matchers(policy: &Policy) -> Vec<String> {
    let mut found = Vec::new();
    for (n, rule) in policy.rules.iter().enumerate() {
        for (k, m) in rule.matchers.iter().enumerate() {
            let taken_by = policy.rules[..n]
                .iter()
                .enumerate()
                .filter(|(_, above)| !above.shadow)
                .find_map(|(i, above)| {
                    let j = above.matchers.iter().position(|a| takes_all_of(a, m))?;
                    Some((i, above, j))
                });
            if let Some((i, above, j)) = taken_by {
                found.push(format!(
                    "rule {}. {} match {} ({}) is never reached: rule {}. {} match {} ({}) takes every request it matches",
                    n + 1,
                    rule.id,
                    k + 1,
                    matcher(m),
                    i + 1,
                    above.id,
                    j + 1,
                    matcher(&above.matchers[j]),
                ));
            }
        }
    }
    found
}

/// The issuers at an Entra ID address (any cloud) left at `challenge: rfc9470`, when a rule or
/// escalation requires authentication contexts: an RFC 9470 issuer's `acrs` is not read, so its
/// users meet such a rule with `403 step_up_not_expressible` where `challenge: entra` would ask
/// them to step up.
fn entra_issuers_without_contexts(policy: &Policy) -> Vec<String> {
    let requires_contexts = policy.rules.iter().any(|rule| {
        !rule.require.auth_contexts.is_empty()
            || rule
                .escalate
                .iter()
                .any(|e| !e.require.auth_contexts.is_empty())
    });
    if !requires_contexts {
        return Vec::new();
    }
    policy
        .issuers
        .iter()
        .filter(|issuer| issuer.challenge == ChallengeStyle::Rfc9470)
        .filter(|issuer| issuer.is_entra())
        .map(|issuer| format!("issuer {} ({})", issuer.id, issuer.issuer))
        .collect()
}

/// Issuers at an Entra ID address whose subject is the pairwise `sub`, under a policy with a risk
/// signal keyed by subject: its counts (and blocks) split over the client applications a user
/// comes through.
fn entra_issuers_with_pairwise_subjects(policy: &Policy) -> Vec<String> {
    if !policy
        .risk
        .signals
        .iter()
        .any(|s| s.key == KeyKind::Subject)
    {
        return Vec::new();
    }
    policy
        .issuers
        .iter()
        .filter(|issuer| issuer.at_entra_address() && issuer.subject_claim == SubjectClaim::Sub)
        .map(|issuer| format!("issuer {} ({})", issuer.id, issuer.issuer))
        .collect()
}

/// Entra ID issuers that accept only `at+jwt` tokens: Entra types its access tokens `JWT`, so
/// every one of them would be refused.
fn entra_issuers_requiring_at_jwt(policy: &Policy) -> Vec<String> {
    policy
        .issuers
        .iter()
        .filter(|issuer| issuer.require_at_jwt && issuer.is_entra())
        .map(|issuer| format!("issuer {} ({})", issuer.id, issuer.issuer))
        .collect()
}

/// The path globs whose last segment names an extension (`/assets/*.js`), by rule and matcher:
/// `/a.*`, the spelling that takes every extension of `/a`, is not one.
fn extension_globs(policy: &Policy) -> Vec<String> {
    globs_where(policy, |glob| {
        let glob = glob.as_str();
        let [cut, _] = without_extension(glob);
        cut.is_some() && !glob.trim_end_matches('/').ends_with(".*")
    })
}

/// The path globs with upper-case letters, by rule and matcher.
fn upper_case_globs(policy: &Policy) -> Vec<String> {
    globs_where(policy, PathGlob::has_upper_case)
}

/// What the policy makes stepgate refuse in request paths that another policy would let through
/// ([`Spelled`](stepgate::request::path::Spelled)): the escapes of the characters its path globs
/// and the string literals of its conditions reading the request spell, and a `+` when they
/// spell a space. `None` when nothing.
fn spelled_refusals(spelled: &stepgate::request::path::Spelled) -> Option<String> {
    let mut refused: Vec<String> = spelled
        .chars()
        .iter()
        .map(|&c| format!("%{c:02X} ({})", char::from(c)))
        .collect();
    if spelled.spells_space() {
        refused.push("+ (the policy spells a space)".to_owned());
    }
    (!refused.is_empty()).then(|| {
        format!(
            "paths refused for what the policy spells (its path globs and the literals of conditions reading the request; invalid_path, docs/hostile-input.md, \"Paths\"): {}",
            refused.join(", ")
        )
    })
}

/// The path globs `which` picks, each named by its rule and matcher.
fn globs_where(policy: &Policy, which: impl Fn(&PathGlob) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for (n, rule) in policy.rules.iter().enumerate() {
        for (k, m) in rule.matchers.iter().enumerate() {
            for glob in m.paths.iter().filter(|g| which(g)) {
                found.push(format!(
                    "rule {}. {} match {} path {}",
                    n + 1,
                    rule.id,
                    k + 1,
                    glob.as_str()
                ));
            }
        }
    }
    found
}

/// The conditions that compare `request.path` with a string literal that has upper-case letters.
/// A rule reads the path as sent and in lower case (as a case-insensitive server would): such a
/// comparison fails on the lower-case reading, so a requirement's `when` never grants on it, an
/// escalation's misses `/admin/export` when it names `/Admin/export`, and a matcher's answers
/// `condition_error`. On `request.path.lowerAscii()` it never holds at all.
fn path_case_mixups(policy: &Policy) -> Vec<String> {
    let mut found = Vec::new();
    for (place, when) in conditions(policy) {
        for mixup in when.path_case_mixups() {
            let literal = &mixup.literal;
            let lower = literal.to_ascii_lowercase();
            found.push(if mixup.lowered {
                format!(
                    "{place}: compares request.path.lowerAscii() with {literal:?}, which it can never equal or contain; write {lower:?}"
                )
            } else {
                format!(
                    "{place}: compares request.path with {literal:?}; compare in one case: request.path.lowerAscii() with {lower:?}"
                )
            });
        }
    }
    found
}

/// The conditions that read a `Decide` attribute decision records do not keep
/// (`records.attributes`): replay decides them with the attribute missing.
fn unrecorded_attributes(policy: &Policy) -> Vec<String> {
    let kept = &policy.records.attributes;
    let mut found = Vec::new();
    for (place, when) in conditions(policy) {
        let (names, other) = when.attribute_reads();
        let missing: Vec<&String> = names.iter().filter(|n| !kept.contains(n)).collect();
        if !missing.is_empty() {
            found.push(format!("{place}: reads {missing:?}"));
        }
        if other {
            found.push(format!(
                "{place}: reads request.attributes other than by a name written in it"
            ));
        }
    }
    found
}

/// Every condition of the policy, with where it stands (`rule 3. wire-transfer escalate 1 when`).
fn conditions(policy: &Policy) -> Vec<(String, &Condition)> {
    let mut all = Vec::new();
    for (n, rule) in policy.rules.iter().enumerate() {
        let rule_name = format!("rule {}. {}", n + 1, rule.id);
        for (k, m) in rule.matchers.iter().enumerate() {
            if let Some(when) = m.when.as_deref() {
                all.push((format!("{rule_name} match {} when", k + 1), when));
            }
        }
        if let Some(when) = rule.require.when.as_deref() {
            all.push((format!("{rule_name} require when"), when));
        }
        for (k, e) in rule.escalate.iter().enumerate() {
            all.push((format!("{rule_name} escalate {} when", k + 1), &e.when));
            if let Some(when) = e.require.when.as_deref() {
                all.push((format!("{rule_name} escalate {} require when", k + 1), when));
            }
        }
    }
    for signal in &policy.risk.signals {
        if let Action::StepUp(require) = &signal.action
            && let Some(when) = require.when.as_deref()
        {
            all.push((format!("risk signal {} step_up when", signal.name), when));
        }
    }
    all
}

/// Whether matcher `a` matches every request `m` matches, as far as their patterns as written
/// tell: `a` has no `when`, and each of its fields is absent or takes all that `m`'s takes (the
/// same pattern, `*` for an operation or host, `/**` for a path, a superset of methods).
fn takes_all_of(a: &Matcher, m: &Matcher) -> bool {
    // Each of `a`'s patterns, when it has any, must take each of `m`'s (which must have some).
    fn all<T>(a: &[T], m: &[T], takes: impl Fn(&T, &T) -> bool) -> bool {
        a.is_empty() || (!m.is_empty() && m.iter().all(|x| a.iter().any(|y| takes(y, x))))
    }
    // The same pattern, or the one that takes everything.
    fn same_or(wide: &str, a: &str, m: &str) -> bool {
        a == wide || a == m
    }
    a.when.is_none()
        && all(a.operation.as_slice(), m.operation.as_slice(), |a, m| {
            same_or("*", a.as_str(), m.as_str())
        })
        && all(&a.methods, &m.methods, |a, m| a == m)
        && all(&a.hosts, &m.hosts, |a, m| {
            same_or("*", a.as_str(), m.as_str())
        })
        && all(&a.paths, &m.paths, |a, m| {
            same_or("/**", a.as_str(), m.as_str())
        })
        && (a.grpc.is_none() || a.grpc == m.grpc)
}

fn matcher(m: &Matcher) -> String {
    let mut parts = Vec::new();
    if let Some(op) = &m.operation {
        parts.push(format!("operation={}", op.as_str()));
    }
    if !m.methods.is_empty() {
        parts.push(format!("methods={}", m.methods.join(",")));
    }
    if !m.hosts.is_empty() {
        let hosts: Vec<&str> = m.hosts.iter().map(|h| h.as_str()).collect();
        parts.push(format!("hosts={}", hosts.join(",")));
    }
    if !m.paths.is_empty() {
        let paths: Vec<&str> = m.paths.iter().map(|p| p.as_str()).collect();
        parts.push(format!("path={}", paths.join(",")));
    }
    if let Some(g) = &m.grpc {
        let method = g.method.as_ref().map_or("*", |w| w.as_str());
        parts.push(format!("grpc={}/{method}", g.service.as_str()));
    }
    if let Some(w) = &m.when {
        parts.push(format!("when {}", w.source));
    }
    if parts.is_empty() {
        "everything".into()
    } else {
        parts.join(" ")
    }
}

/// `, scopes=[…], auth_contexts=[…], …` (empty when the requirement states nothing).
fn requirement(r: &Requirement) -> String {
    let mut parts = Vec::new();
    let mut list = |name: &str, v: &[String]| {
        if !v.is_empty() {
            parts.push(format!("{name}=[{}]", v.join(", ")));
        }
    };
    list("scopes", &r.scopes);
    list("roles", &r.roles);
    list("auth_contexts", &r.auth_contexts);
    list("acr", &r.acr);
    list("amr", &r.amr);
    if let Some(age) = r.max_age {
        parts.push(format!("max_age={age}s"));
    }
    for c in &r.claims {
        parts.push(format!("claim {}∈{:?}", c.claim, c.any_of));
    }
    if let Some(w) = &r.when {
        parts.push(format!("when {}", w.source));
    }
    parts.iter().map(|p| format!(", {p}")).collect()
}
