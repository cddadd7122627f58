//! The engine: `decide(policy, request, now) → Decision`.
//!
//! Order (each step may end the evaluation):
//! 1. content, credential shape and path: unusable → 400 `invalid_request` (431 past a header
//!    limit);
//! 2. token verification: invalid → 401 `invalid_token` (a presented token is always verified, even
//!    on anonymous routes), and a token bound to a client certificate (RFC 8705) held to the one
//!    the request was made with;
//! 3. rule matching, first match wins; a condition that cannot be evaluated denies;
//! 4. no token → 401 with a bare `Bearer realm` (nothing about the route is revealed);
//! 5. requirement = the rule's + every escalation whose condition holds (or cannot be evaluated:
//!    failing towards the stronger requirement) + every `step_up` risk signal at its threshold for
//!    the request's key;
//! 6. authorization (issuer, scopes, roles, claims, `when`) → 403 `insufficient_scope`;
//! 7. authentication (auth contexts, acr, amr, max_age) → STEP_UP in the issuer's challenge style,
//!    or DENY where the caller cannot step up.

use std::{borrow::Cow, cell::RefCell, collections::BTreeMap, sync::Arc};

use serde_json::Value;

use super::{Decision, ExplainStep, Outcome, Reason, Shadow, StepUp};
use crate::{
    challenge,
    identity::{
        self, CertificateProblem, ChallengeStyle, ClientCertificate, Credential, CredentialProblem,
        Presented, Thumbprint, VerifiedToken, fingerprint_of, thumbprint,
    },
    policy::{
        ClaimRequirement, DefaultAction, HeaderSource, Matcher, PathCase, Policy, Requirement,
        Rule,
        condition::{CelInput, Condition, Readings},
    },
    request::{
        AccessRequest, Established, PresentedCredential, RequestProblem, is_valid_operation, path,
    },
    risk::signals::{Action, Keys, Signal},
    stripe::local_copy,
};

/// Decides one request at unix time `now`.
pub fn decide(policy: &Policy, request: &AccessRequest, now: i64) -> Decision {
    decide_at(policy, request, now, now * 1000)
}

/// [`decide`], reading the risk signals' counters at `now_ms` (unix milliseconds, the same
/// instant as `now`).
pub fn decide_at(policy: &Policy, request: &AccessRequest, now: i64, now_ms: i64) -> Decision {
    let risk = RiskReads {
        recorded: request.risk_counts.as_deref(),
        now_ms,
        read: RefCell::new(Vec::new()),
    };
    let mut run = Run {
        policy,
        explain: request.explain.then(Vec::new),
        fingerprint: None,
        token_cached: None,
        risk: &risk,
        shadows: Vec::new(),
        verified: None,
        certificate: None,
        head_as_get: false,
        settled: None,
    };
    let mut decision = run.evaluate(request, now);
    if policy.index.heads_apart() && request.http.as_ref().is_some_and(|h| h.method == "HEAD") {
        let as_head = run.settled;
        decision = decided_as_a_get_too(&mut run, request, now, decision, as_head);
    }
    decision.shadow = run.shadows;
    decision.verified = run.verified;
    decision.client_certificate = run.certificate.map(Box::new);
    decision.risk_counts = risk.read.into_inner();
    if decision.is_allow()
        && let Some(http) = &request.http
    {
        decision.stray_headers = stray_headers(policy, http);
    }
    fit_proxy_header_limit(policy, request, decision)
}

/// The request's headers named like stepgate's own that the policy's identity headers (set or
/// removed already) do not cover.
fn stray_headers(policy: &Policy, http: &crate::request::HttpAttributes) -> Vec<String> {
    http.stepgate_named_headers()
        .into_iter()
        .filter(|name| {
            !policy
                .upstream
                .identity_headers
                .iter()
                .any(|(configured, _)| configured.eq_ignore_ascii_case(name))
        })
        .map(str::to_owned)
        .collect()
}

/// How a decision reads the risk signals' counts: from the live counters at `now_ms`, or from
/// the counts a record holds (replay); and the counts it read that were not zero, for its record.
struct RiskReads<'a> {
    recorded: Option<&'a BTreeMap<String, u64>>,
    now_ms: i64,
    read: RefCell<Vec<(Arc<str>, u64)>>,
}

impl RiskReads<'_> {
    /// `signal`'s count for `key` (0 without a key); replaying, the recorded count, whether or
    /// not replay knows the key (it has no token to fingerprint).
    fn count(&self, signal: &Signal, key: Option<&str>) -> u64 {
        let count = match (self.recorded, key) {
            (Some(recorded), _) => recorded.get(&*signal.name).copied().unwrap_or(0),
            (None, Some(key)) => signal.count(key, self.now_ms),
            (None, None) => 0,
        };
        if count > 0 {
            let mut read = self.read.borrow_mut();
            if !read.iter().any(|(name, _)| *name == signal.name) {
                read.push((Arc::clone(&signal.name), count));
            }
        }
        count
    }
}

/// What `rule` answers a token that is already verified, with no request around it: the admin
/// API's own requirement (`admin.require`), held to exactly what a rule's `require` is held to.
/// `certificate`: the connection's client certificate, when the token is bound to it (the
/// caller checked the binding).
pub fn decide_token(
    policy: &Policy,
    rule: &Rule,
    token: &VerifiedToken,
    certificate: Option<Thumbprint>,
    now: i64,
) -> Decision {
    let risk = RiskReads {
        recorded: None,
        now_ms: now.saturating_mul(1000),
        read: RefCell::new(Vec::new()),
    };
    let mut run = Run {
        policy,
        explain: None,
        fingerprint: None,
        token_cached: None,
        risk: &risk,
        shadows: Vec::new(),
        verified: None,
        certificate: certificate.map(Ok),
        head_as_get: false,
        settled: None,
    };
    let request = AccessRequest::default();
    let input = CelInput::new(&policy.cel, &request, None, Some(&token.claims), now);
    // Risk signals are about the API's traffic: a count anyone holding a token of an operator's
    // subject can raise must not lock the operators out of the admin API.
    run.apply_rule(rule, Some(token), &input, now, &Keys::default())
}

/// Most servers answer a HEAD with their GET handler: under a policy with a matcher that takes a
/// HEAD and not a GET, a HEAD (decided as itself: `head`) is decided as a GET too, aside, in
/// every reading of its path, and the stricter answer stands (a HEAD probe rule must not run the
/// export's GET handler without the export's requirement met; on a tie, the HEAD's own answer).
/// Under two rules, one asking a step-up and the other allowing it or asking one too, the HEAD
/// is refused as ambiguous instead: each asking what the other's token may lack (`c1`, `c2`),
/// they would challenge the client in turn for ever.
fn decided_as_a_get_too<'p>(
    run: &mut Run<'p>,
    request: &AccessRequest,
    now: i64,
    mut head: Decision,
    head_rule: Option<&'p Rule>,
) -> Decision {
    let as_get = run.aside(|run| {
        run.head_as_get = true;
        let decision = run.evaluate(request, now);
        run.head_as_get = false;
        decision
    });
    let get_rule = run.settled;
    let strictness = |d: &Decision| match d.outcome {
        Outcome::Allow => 0,
        Outcome::StepUp => 1,
        Outcome::Deny => 2,
    };
    // By the rule each reading settled on: a decision names none to an anonymous caller.
    let ruled = |rule: Option<&Rule>| {
        rule.map_or_else(|| "no rule".to_owned(), |r| format!("rule {:?}", r.id))
    };
    let same_rule = match (head_rule, get_rule) {
        (Some(head), Some(get)) => std::ptr::eq(head, get),
        (None, None) => true,
        _ => false,
    };
    let (explain, cached) = (std::mem::take(&mut head.explain), head.token_cached);
    let challenged = head.outcome != Outcome::Deny
        && as_get.outcome != Outcome::Deny
        && !(head.is_allow() && as_get.is_allow());
    let (mut answer, said) = if same_rule || !challenged {
        let decided = format!(
            "decided as a GET too, as servers answer a HEAD with their GET handler: {} ({}) \
             under {}",
            as_get.outcome.as_str(),
            as_get.reason.as_str(),
            ruled(get_rule),
        );
        if strictness(&as_get) > strictness(&head) {
            let said = format!(
                "{decided}, stricter than the HEAD's {} ({})",
                head.outcome.as_str(),
                head.reason.as_str(),
            );
            (as_get, Some(said))
        } else {
            (
                head,
                Some(format!(
                    "{decided}; the HEAD's own answer, as strict, stands"
                )),
            )
        }
    } else {
        let said = format!(
            "the request picks {} as a HEAD ({}) and {} as a GET ({}): {AMBIGUOUS_HEAD}",
            ruled(head_rule),
            head.outcome.as_str(),
            ruled(get_rule),
            as_get.outcome.as_str(),
        );
        let www = challenge::invalid_request(&run.policy.realm, AMBIGUOUS_HEAD);
        // As the other readings' refusals: the HEAD's rule named to a verified caller only, and
        // the token's fingerprint kept for the log and the record.
        let rule = head_rule.filter(|_| run.verified.is_some());
        let mut refused = run.deny(400, Reason::AmbiguousPath, AMBIGUOUS_HEAD, rule, Some(www));
        refused.token_fingerprint = head.token_fingerprint.take();
        (refused, Some(said))
    };
    answer.explain = explain;
    if let Some(said) = said.filter(|_| request.explain) {
        answer.explain.push(ExplainStep {
            stage: "head",
            detail: said,
        });
    }
    // The token was verified once for the request; the GET's reading found it cached.
    answer.token_cached = cached;
    answer
}

/// Envoy refuses (500) an allowed request once the headers stepgate adds push it over its
/// `max_headers_count`; a clear 431 is the better answer. Only `Check` requests carry a count.
fn fit_proxy_header_limit(
    policy: &Policy,
    request: &AccessRequest,
    mut decision: Decision,
) -> Decision {
    let limit = policy.upstream.max_request_headers;
    let (Some(count), Some(http)) = (request.proxy_header_count, request.http.as_ref()) else {
        return decision;
    };
    if !decision.is_allow() || limit == 0 {
        return decision;
    }
    let present = |name: &str| http.headers.contains_key(name);
    let added = decision
        .identity_headers
        .iter()
        .filter(|(name, _)| !present(name))
        .count();
    let removed = policy
        .upstream
        .headers_to_remove(&decision.identity_headers)
        .filter(|name| present(name))
        .count()
        + decision.stray_headers.len();
    if count + added <= limit + removed {
        return decision;
    }
    let message = format!(
        "the request has {count} headers; with stepgate's {added} identity headers it would exceed \
         the proxy's limit of {limit}"
    );
    if request.explain {
        decision.explain.push(ExplainStep {
            stage: "decision",
            detail: message.clone(),
        });
    }
    decision.outcome = Outcome::Deny;
    decision.reason = Reason::TooManyHeaders;
    decision.http_status = 431;
    decision.message = message.into();
    decision.identity_headers.clear();
    decision
}

struct Run<'p> {
    policy: &'p Policy,
    explain: Option<Vec<ExplainStep>>,
    fingerprint: Option<String>,
    token_cached: Option<bool>,
    risk: &'p RiskReads<'p>,
    /// What shadow rules and escalations would have answered.
    shadows: Vec<Shadow>,
    /// The token, once verified.
    verified: Option<Arc<VerifiedToken>>,
    /// The client certificate presented with a token bound to one, as read.
    certificate: Option<Presented>,
    /// A HEAD's methods read as a GET's, in every reading of the path.
    head_as_get: bool,
    /// The rule the last evaluation settled on (its matcher matched, or its condition could not
    /// be evaluated), whether or not the decision names it.
    settled: Option<&'p Rule>,
}

/// The requirement in force after escalations, borrowed from the policy where possible.
#[derive(Default, Clone)]
struct Effective<'p> {
    scopes: Vec<&'p str>,
    roles: Vec<&'p str>,
    claims: Vec<&'p ClaimRequirement>,
    conditions: Vec<&'p Condition>,
    auth_contexts: Vec<&'p str>,
    /// The `acr` values still acceptable (`None`: any). A token has one `acr`, so each list
    /// that applies narrows it: never widens it. Empty when two lists share no value.
    acr: Option<Vec<&'p str>>,
    amr: Vec<&'p str>,
    max_age: Option<u64>,
    certificate_bound: bool,
}

impl<'p> Effective<'p> {
    fn add(&mut self, r: &'p Requirement) {
        fn union<'a>(into: &mut Vec<&'a str>, from: &'a [String]) {
            for v in from {
                if !into.contains(&v.as_str()) {
                    into.push(v);
                }
            }
        }
        union(&mut self.scopes, &r.scopes);
        union(&mut self.roles, &r.roles);
        union(&mut self.auth_contexts, &r.auth_contexts);
        union(&mut self.amr, &r.amr);
        self.claims.extend(&r.claims);
        self.conditions.extend(r.when.as_deref());
        // Every acr list that applies must accept the token's one `acr`: the values the new
        // list shares with those in force, in its order of preference (an escalation or a
        // risk signal names the stronger levels first; it can never name a weaker one in).
        if !r.acr.is_empty() {
            let listed = r.acr.iter().map(String::as_str);
            self.acr = Some(match self.acr.take() {
                None => listed.collect(),
                Some(before) => listed.filter(|v| before.contains(v)).collect(),
            });
        }
        self.max_age = match (self.max_age, r.max_age) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.certificate_bound |= r.certificate_bound;
    }
}

impl<'p> Run<'p> {
    fn step(&mut self, stage: &'static str, detail: impl FnOnce() -> String) {
        if let Some(steps) = &mut self.explain {
            steps.push(ExplainStep {
                stage,
                detail: detail(),
            });
        }
    }

    fn evaluate(&mut self, request: &AccessRequest, now: i64) -> Decision {
        let policy = self.policy;
        self.settled = None;
        let realm = policy.realm.as_str();

        // 1. Content, credential shape and path.
        let operation_problem = request
            .operation
            .as_deref()
            .is_some_and(|operation| !is_valid_operation(operation))
            .then_some(RequestProblem::InvalidOperation);
        if let Some(problem) = request.problem.as_ref().or(operation_problem.as_ref()) {
            let message = problem.describe();
            self.step("request", || message.clone());
            let (status, reason) = match problem {
                RequestProblem::NotUtf8(RequestProblem::PATH_FIELD) => (400, Reason::InvalidPath),
                RequestProblem::NotUtf8(_)
                | RequestProblem::NothingToMatch
                | RequestProblem::TooManyEntries(_)
                | RequestProblem::DuplicateHeader(_)
                | RequestProblem::InvalidOperation
                | RequestProblem::Undecodable => (400, Reason::MalformedRequest),
                RequestProblem::TooManyHeaders { .. } => (431, Reason::TooManyHeaders),
                RequestProblem::HeadersTooLarge { .. } => (431, Reason::HeadersTooLarge),
                RequestProblem::AttributesTooLarge { .. } => (413, Reason::RequestTooLarge),
            };
            let www = (status == 400).then(|| challenge::invalid_request(realm, &message));
            return self.deny(status, reason, &message, None, www);
        }
        if let Some(message) = request.http.as_ref().and_then(|h| {
            h.method_problem()
                .or_else(|| h.override_problem())
                .or_else(|| h.authority_problem())
                .or_else(|| {
                    // Host rules cannot match a request that names no host as its server reads it.
                    (h.host.is_empty() && policy.index.names_hosts()).then_some(
                        "an HTTP request without a host is refused: the policy's rules match \
                         hosts (set http.host)",
                    )
                })
                .or_else(|| {
                    // Servers that trust it (Express's `trust proxy`, Django's
                    // USE_X_FORWARDED_HOST) route on it: another host than the rules saw.
                    h.headers
                        .get("x-forwarded-host")
                        .filter(|_| policy.index.names_hosts())
                        .filter(|forwarded| !crate::request::same_host(forwarded, h.host_as_sent()))
                        .map(|_| {
                            "an x-forwarded-host header naming another host is refused: the \
                             policy's rules match hosts, and some servers route on it"
                        })
                })
                .or_else(|| {
                    // Spring's ForwardedHeaderFilter and Quarkus route on its `host=`.
                    h.headers
                        .get("forwarded")
                        .filter(|_| policy.index.names_hosts())
                        .filter(|forwarded| {
                            // Past the bound on its hosts, refused as naming another.
                            crate::request::forwarded_hosts(forwarded).is_none_or(|hosts| {
                                hosts.iter().any(|forwarded| {
                                    !crate::request::same_host(forwarded, h.host_as_sent())
                                })
                            })
                        })
                        .map(|_| {
                            "a Forwarded header naming another host is refused: the policy's \
                             rules match hosts, and some servers route on its host="
                        })
                })
        }) {
            self.step("request", || message.to_owned());
            let www = challenge::invalid_request(realm, message);
            return self.deny(400, Reason::MalformedRequest, message, None, Some(www));
        }
        let identity_names = policy.upstream.identity_headers.iter().map(|(n, _)| &**n);
        if request
            .http
            .as_ref()
            .is_some_and(|h| h.identity_header_spelling(identity_names).is_some())
        {
            // The name as sent is the client's: not echoed.
            let message = "a header spelling an identity header with `_` for `-` is refused: some \
                           servers read it as that header";
            self.step("request", || message.to_owned());
            let www = challenge::invalid_request(realm, message);
            return self.deny(400, Reason::MalformedRequest, message, None, Some(www));
        }
        let mut credential = request.credential();
        // A query token is never read, so never verified: beside a header's it is a second
        // credential, alone one the upstream might take unverified (on a route open to anonymous
        // callers). Either way it is refused.
        if request.http.as_ref().is_some_and(|h| h.has_query_token()) {
            credential = Credential::Malformed(match credential {
                Credential::Missing => CredentialProblem::QueryToken,
                _ => CredentialProblem::MultipleCredentials,
            });
        }
        if let Credential::Malformed(problem) = credential {
            self.step("credential", || problem.describe().to_owned());
            let www = challenge::invalid_request(realm, problem.describe());
            return self.deny(400, problem.into(), problem.describe(), None, Some(www));
        }
        let normalized = match request.http.as_ref().map(|h| {
            path::normalize(&h.target, policy.upstream.path_parameters).and_then(|read| {
                // A path already in normal form (borrowed) has no escape to look at.
                let spelled = &policy.upstream.spelled;
                match (&read.0, spelled.spells_space()) {
                    (Cow::Borrowed(_), false) => Ok(read),
                    _ => spelled.refuses(&h.target).map_or(Ok(read), Err),
                }
            })
        }) {
            None => None,
            Some(Ok((path, _query))) => Some(path),
            Some(Err(problem)) => {
                self.step("credential", || problem.describe().to_owned());
                let www = challenge::invalid_request(realm, problem.describe());
                return self.deny(
                    400,
                    Reason::InvalidPath,
                    problem.describe(),
                    None,
                    Some(www),
                );
            }
        };

        // 2. Token.
        let token = match (&request.credential, credential) {
            (PresentedCredential::Verified(Established(token)), _) => {
                self.verified = Some(Arc::clone(token));
                self.step("token", || {
                    format!(
                        "a token of issuer {:?} for subject {:?}, as recorded (not verified again)",
                        token.issuer.id, token.principal.subject
                    )
                });
                Some(Arc::clone(token))
            }
            (_, credential) => match credential {
                Credential::Bearer(raw) => {
                    let (digest, verified, cached) = policy.token_cache.verify(
                        raw,
                        &policy.issuers,
                        policy.max_token_bytes,
                        now,
                    );
                    self.fingerprint = Some(fingerprint_of(&digest));
                    self.token_cached = Some(cached);
                    match verified {
                        Ok(token) if token.admin_only => {
                            let message = "the token is meant for the admin API: its aud holds \
                                           none but admin.audiences";
                            self.step("token", || message.to_owned());
                            let www = challenge::invalid_token(realm, message);
                            return self.deny(
                                401,
                                Reason::AudienceMismatch,
                                message,
                                None,
                                Some(www),
                            );
                        }
                        Ok(token) => {
                            self.verified = Some(Arc::clone(&token));
                            self.step("token", || {
                                format!(
                                    "valid token from issuer {:?} for subject {:?}",
                                    token.issuer.id, token.principal.subject
                                )
                            });
                            Some(token)
                        }
                        Err(err) => {
                            let message = err.to_string();
                            self.step("token", || message.clone());
                            let www = challenge::invalid_token(realm, &message);
                            let mut d = self.deny(401, (&err).into(), &message, None, Some(www));
                            if let identity::TokenError::UnknownKey {
                                issuer,
                                kid: Some(kid),
                            } = err
                            {
                                d.unknown_key = Some(Box::new((issuer, kid)));
                            }
                            return d;
                        }
                    }
                }
                Credential::Missing => {
                    self.step("credential", || "no credential presented".to_owned());
                    None
                }
                Credential::Malformed(_) => unreachable!("handled above"),
            },
        };

        // A token bound to a client certificate is good only with it (RFC 8705 §3).
        if let Some(&bound) = token
            .as_ref()
            .and_then(|t| t.certificate_binding.as_deref())
            && let Some(refused) = self.certificate_binding(request, &bound)
        {
            return refused;
        }

        // 3. Rule.
        let risk_fingerprint = (!policy.risk.signals.is_empty())
            .then(|| self.fingerprint.clone())
            .flatten();
        let risk_keys = Keys {
            subject: token.as_ref().map(|t| &*t.principal.subject),
            tenant: token.as_ref().and_then(|t| t.principal.tenant.as_deref()),
            client_id: token
                .as_ref()
                .and_then(|t| t.principal.client_id.as_deref()),
            token: token.as_ref().and(risk_fingerprint.as_deref()),
            source: request.source.as_ref().map(|s| s.address.as_str()),
        };
        let risk = self.risk;
        let risk_counts = || {
            let mut counts = serde_json::Map::new();
            for signal in &policy.risk.signals {
                let n = risk.count(signal, signal.key_of(&risk_keys).as_deref());
                counts.insert(signal.name.to_string(), Value::from(n));
            }
            counts
        };
        // Rules match the path in lower case (servers that serve `/ADMIN` as `/admin`); CEL sees
        // it in its own case and, when that differs, in lower case too (`Readings`).
        let lowered = normalized.as_deref().map(|path| {
            if path.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(path.to_ascii_lowercase())
            } else {
                Cow::Borrowed(path)
            }
        });
        // The path as upstreams that cut a trailing slash or an extension route it: the rules
        // must pick the same one on it (below), and conditions that read the path see it too.
        let sent = normalized.as_deref();
        let slashless = sent
            .filter(|p| p.len() > 1 && p.ends_with('/'))
            .map(|p| &p[..p.len() - 1]);
        let cuts = match sent {
            Some(sent) if policy.upstream.format_suffix_either => path::without_extension(sent),
            _ => [None, None],
        };
        // Each in its own case and in lower case, as the path itself is read.
        let lower = |p: &str| {
            p.bytes()
                .any(|b| b.is_ascii_uppercase())
                .then(|| p.to_ascii_lowercase())
        };
        let slashless_lowered = slashless.and_then(lower);
        let cuts_lowered = cuts.each_ref().map(|cut| cut.as_deref().and_then(lower));
        let slash_readings = slashless.into_iter().chain(slashless_lowered.as_deref());
        // A cut keeps the trailing slash (`/reports/export.csv/` is `/reports/export/`), and
        // Rails drops that too before its format: each cut without it as well.
        let without_slash = |cut: &String| {
            (cut.len() > 1 && cut.ends_with('/')).then(|| cut[..cut.len() - 1].to_owned())
        };
        let cuts_slashless = [&cuts, &cuts_lowered]
            .map(|cuts| cuts.each_ref().map(|c| c.as_ref().and_then(without_slash)));
        let cut_readings = cuts
            .iter()
            .chain(&cuts_lowered)
            .chain(cuts_slashless.iter().flatten())
            .flatten();
        let input = CelInput::new(
            &policy.cel,
            request,
            normalized.as_deref(),
            token.as_ref().map(|t| &t.claims),
            now,
        )
        .with_risk(&risk_counts)
        .with_readings(lowered.as_deref())
        .with_path_readings(
            slash_readings
                .map(|path| (path, false))
                .chain(cut_readings.map(|path| (path.as_str(), true))),
        );
        let lowered = lowered.as_deref();
        let path = PathReading {
            lowered,
            in_case: (policy.upstream.path_case == PathCase::Sensitive)
                .then_some(sent)
                .flatten(),
            slash_apart: false,
            head_as_get: self.head_as_get,
        };
        // How the upstream reads letter case is not known: the path read in its own case must
        // pick the rule it picks in lower case, or one reading would let a request through under
        // a rule the upstream does not route it to (`/DOCS/billing` is `/docs/**` to ASP.NET Core
        // and `/<org>/billing` to Flask).
        let either_case = policy.upstream.path_case == PathCase::Either
            && sent.is_some()
            && (sent != lowered || policy.index.globs_in_case());
        if either_case {
            let in_case = PathReading {
                lowered,
                in_case: sent,
                slash_apart: false,
                head_as_get: self.head_as_get,
            };
            let said = |lower: &str, case: &str| {
                format!(
                    "the path picks {lower} in lower case and {case} in its own case: {AMBIGUOUS_PATH}"
                )
            };
            if let Some(denial) = self.readings_disagree(
                request,
                &input,
                token.is_some(),
                [path, in_case],
                said,
                AMBIGUOUS_PATH,
            ) {
                return denial;
            }
        }
        // Nor is whether the upstream tells `/a/` from `/a`: a path with a trailing slash must
        // pick the same rule either way (`/healthz/` is `/healthz` to ASP.NET Core, and another
        // route to Go and Flask). Under `path_case: either`, in its own case too: Go and Flask
        // read both the case and the slash as sent, so `/docs/GUIDE/` is their `/docs/` subtree
        // even where `/docs/guide/` and `/docs/GUIDE` are other routes.
        if sent.is_some_and(|p| p.len() > 1 && p.ends_with('/')) {
            let apart = PathReading {
                slash_apart: true,
                head_as_get: self.head_as_get,
                ..path
            };
            let apart_in_case = either_case.then_some(PathReading {
                lowered,
                in_case: sent,
                slash_apart: true,
                head_as_get: self.head_as_get,
            });
            for apart in std::iter::once(apart).chain(apart_in_case) {
                let said = |together: &str, apart: &str| {
                    format!(
                        "the path picks {together} as the path without its trailing slash and \
                         {apart} as a path of its own: {AMBIGUOUS_SLASH}"
                    )
                };
                if let Some(denial) = self.readings_disagree(
                    request,
                    &input,
                    token.is_some(),
                    [path, apart],
                    said,
                    AMBIGUOUS_SLASH,
                ) {
                    return denial;
                }
            }
        }
        // Nor is whether it serves `/a.json` from its `/a` route: Rails gives every route an
        // optional `(.:format)` unless it says `format: false`, and Spring MVC up to 5.2 maps
        // `/a` to `/a.*` as well. A path whose last segment has an extension must pick the same
        // rule without it, or the protective `/payments/wire` would be skipped for
        // `/payments/wire.json` and a catch-all decide.
        // Under `path_case: either`, the cut in its own case too: Rails reads case as sent.
        if policy.upstream.format_suffix_either {
            for (cut, cut_lowered) in cuts.iter().zip(&cuts_lowered) {
                let Some(cut) = cut else { continue };
                let cut_lowered = Some(cut_lowered.as_deref().unwrap_or(cut));
                let without = PathReading {
                    lowered: cut_lowered,
                    in_case: path.in_case.map(|_| cut.as_str()),
                    slash_apart: false,
                    head_as_get: self.head_as_get,
                };
                let without_in_case = either_case.then_some(PathReading {
                    lowered: cut_lowered,
                    in_case: Some(cut),
                    slash_apart: false,
                    head_as_get: self.head_as_get,
                });
                for without in std::iter::once(without).chain(without_in_case) {
                    let said = |with: &str, without: &str| {
                        format!(
                            "the path picks {with} as sent and {without} without the extension \
                             of its last segment: {AMBIGUOUS_EXTENSION}"
                        )
                    };
                    if let Some(denial) = self.readings_disagree(
                        request,
                        &input,
                        token.is_some(),
                        [path, without],
                        said,
                        AMBIGUOUS_EXTENSION,
                    ) {
                        return denial;
                    }
                }
            }
        }
        // Shadow rules that match are evaluated and recorded; the first enforcing one decides.
        let mut from = 0;
        let rule = loop {
            match self.find_rule(from, request, path, &input) {
                Ok(Some((at, rule))) if rule.shadow => {
                    self.shadow_rule(rule, token.as_deref(), &input, now, &risk_keys);
                    from = at + 1;
                }
                Ok(found) => break found.map(|(_, rule)| rule),
                Err((at, rule, Undecided::Host)) if rule.shadow => {
                    self.record_shadow(rule, None, Outcome::Deny, Reason::AmbiguousHost);
                    self.step("shadow", || {
                        format!("rule {:?} (shadow) would deny: {AMBIGUOUS_HOST}", rule.id)
                    });
                    from = at + 1;
                }
                Err((_, rule, Undecided::Host)) => {
                    self.settled = Some(rule);
                    self.step("match", || {
                        let host = request.http.as_ref().map(|h| h.host_as_sent());
                        format!(
                            "rule {:?} matches the host {:?} only without its port or trailing \
                             dot: {AMBIGUOUS_HOST}",
                            rule.id,
                            host.unwrap_or_default()
                        )
                    });
                    // Said to anonymous callers too: it names no rule and no requirement.
                    let www = challenge::invalid_request(realm, AMBIGUOUS_HOST);
                    let rule = token.is_some().then_some(rule);
                    return self.deny(400, Reason::AmbiguousHost, AMBIGUOUS_HOST, rule, Some(www));
                }
                Err((at, rule, Undecided::Condition(message))) if rule.shadow => {
                    self.record_shadow(rule, None, Outcome::Deny, Reason::ConditionError);
                    self.step("shadow", || {
                        format!("rule {:?} (shadow) would deny: {message}", rule.id)
                    });
                    from = at + 1;
                }
                Err((_, rule, Undecided::Condition(message))) => {
                    self.settled = Some(rule);
                    self.step("match", || message.clone());
                    // Without a token, say only that one is needed: the condition (and the rule)
                    // may well be about claims, and nothing about a route is revealed to
                    // anonymous callers.
                    if token.is_none() {
                        return self.token_missing();
                    }
                    return self.deny(403, Reason::ConditionError, &message, Some(rule), None);
                }
            }
        };
        self.settled = rule;
        let Some(rule) = rule else {
            self.step("default", || {
                format!("no rule matched; default is {:?}", policy.default)
            });
            return match (policy.default, token.as_ref()) {
                (_, None) => self.token_missing(),
                (DefaultAction::Deny, Some(token)) => {
                    let message = "no rule matches this request and the policy denies by default";
                    let mut d = self.deny(403, Reason::NoMatchingRule, message, None, None);
                    d.principal = Some(token.principal.clone());
                    d
                }
                (DefaultAction::AllowAuthenticated, Some(token)) => {
                    self.allow(Reason::DefaultAllowed, None, Some(token))
                }
            };
        };
        self.step("match", || format!("rule {:?}", rule.id));
        self.apply_rule(rule, token.as_deref(), &input, now, &risk_keys)
    }

    /// Steps 4 to 7 for the rule that matched.
    fn apply_rule(
        &mut self,
        rule: &'p Rule,
        token: Option<&VerifiedToken>,
        input: &CelInput<'_>,
        now: i64,
        risk_keys: &Keys<'_>,
    ) -> Decision {
        let policy = self.policy;
        if rule.allow_anonymous {
            return self.allow(Reason::AnonymousAllowed, Some(rule), token);
        }
        // 4. Anonymous on a protected route: reveal nothing about the route.
        let Some(token) = token else {
            return self.token_missing();
        };

        // 5. Requirement with escalations.
        let mut effective = Effective::default();
        effective.add(&rule.require);
        let mut shadow_escalations = Vec::new();
        for (i, escalation) in rule.escalate.iter().enumerate() {
            let mode = if escalation.shadow { " (shadow)" } else { "" };
            let holds = match escalation.when.evaluate_readings(input, Readings::Any) {
                Ok(true) => {
                    self.step("escalate", || {
                        format!("{:?} holds{mode}", escalation.when.source)
                    });
                    true
                }
                Ok(false) => {
                    self.step("escalate", || {
                        format!("{:?} does not hold{mode}", escalation.when.source)
                    });
                    false
                }
                Err(message) => {
                    self.step("escalate", || {
                        format!("{message}; escalating (fail closed){mode}")
                    });
                    true
                }
            };
            match (holds, escalation.shadow) {
                (true, false) => effective.add(&escalation.require),
                (true, true) => shadow_escalations.push(i),
                (false, _) => {}
            }
        }
        for signal in &policy.risk.signals {
            let Action::StepUp(require) = &signal.action else {
                continue;
            };
            let count = self.risk.count(signal, signal.key_of(risk_keys).as_deref());
            if signal.reached(count) {
                self.step("risk", || {
                    format!(
                        "risk signal {:?} counts {count} for this {} (threshold {}): its \
                         step-up applies",
                        signal.name,
                        signal.key.as_str(),
                        signal.threshold
                    )
                });
                effective.add(require);
            }
        }
        // What each shadow escalation that holds would add, decided aside.
        for i in shadow_escalations {
            let mut with = effective.clone();
            with.add(&rule.escalate[i].require);
            let would = self.aside(|run| run.requirement_met(rule, token, &with, input, now));
            self.step("shadow", || {
                format!(
                    "escalate[{i}] (shadow) would answer {} {}",
                    would.outcome.as_str(),
                    would.reason.as_str()
                )
            });
            self.record_shadow(rule, Some(i), would.outcome, would.reason);
        }
        self.requirement_met(rule, token, &effective, input, now)
    }

    /// Steps 6 and 7: authorization, then authentication strength.
    fn requirement_met(
        &mut self,
        rule: &'p Rule,
        token: &VerifiedToken,
        effective: &Effective<'p>,
        input: &CelInput<'_>,
        now: i64,
    ) -> Decision {
        if let Some(denied) = self.authorize(rule, token, effective, input) {
            return denied;
        }
        self.authenticate(rule, token, effective, now)
    }

    /// Evaluates a shadow rule and records what it would answer.
    fn shadow_rule(
        &mut self,
        rule: &'p Rule,
        token: Option<&VerifiedToken>,
        input: &CelInput<'_>,
        now: i64,
        risk_keys: &Keys<'_>,
    ) {
        let would = self.aside(|run| run.apply_rule(rule, token, input, now, risk_keys));
        self.step("shadow", || {
            format!(
                "rule {:?} (shadow) matches and would answer {} {}; the next matching rule decides",
                rule.id,
                would.outcome.as_str(),
                would.reason.as_str()
            )
        });
        self.record_shadow(rule, None, would.outcome, would.reason);
    }

    /// The `400 ambiguous_path` denial when two readings of the path pick different rules
    /// (shadow rules passed over), each named by `said` in the explain trace; `None` when they
    /// agree. The rule of the first reading is named to a verified caller only.
    fn readings_disagree(
        &mut self,
        request: &AccessRequest,
        input: &CelInput<'_>,
        verified: bool,
        readings: [PathReading<'_>; 2],
        said: impl FnOnce(&str, &str) -> String,
        message: &'static str,
    ) -> Option<Decision> {
        let policy = self.policy;
        let [first, second] =
            readings.map(|reading| first_enforced(policy, request, reading, input));
        if first == second {
            return None;
        }
        self.step("match", || {
            let id = |at: Result<Option<usize>, usize>| match at {
                Ok(Some(at)) | Err(at) => format!("rule {:?}", policy.rules[at].id),
                Ok(None) => "no rule".to_owned(),
            };
            said(&id(first), &id(second))
        });
        let www = challenge::invalid_request(&policy.realm, message);
        let rule = match first {
            Ok(Some(at)) | Err(at) if verified => Some(&policy.rules[at]),
            _ => None,
        };
        Some(self.deny(400, Reason::AmbiguousPath, message, rule, Some(www)))
    }

    /// A decision made aside (a shadow's): it neither adds to the explain trace nor takes the
    /// token's fingerprint, and the shadows it finds are not recorded.
    fn aside(&mut self, decide: impl FnOnce(&mut Self) -> Decision) -> Decision {
        let explain = self.explain.take();
        let fingerprint = self.fingerprint.take();
        let recorded = self.shadows.len();
        let decision = decide(self);
        self.shadows.truncate(recorded);
        self.explain = explain;
        self.fingerprint = fingerprint;
        decision
    }

    fn record_shadow(
        &mut self,
        rule: &Rule,
        escalation: Option<usize>,
        outcome: Outcome,
        reason: Reason,
    ) {
        self.shadows.push(Shadow {
            rule: local_copy(&rule.id),
            escalation,
            outcome,
            reason,
        });
    }

    fn find_rule(
        &self,
        from: usize,
        request: &AccessRequest,
        path: PathReading<'_>,
        input: &CelInput<'_>,
    ) -> Found<'p> {
        find_rule(self.policy, from, request, path, input)
    }

    fn authorize(
        &mut self,
        rule: &'p Rule,
        token: &VerifiedToken,
        effective: &Effective<'p>,
        input: &CelInput<'_>,
    ) -> Option<Decision> {
        let realm = self.policy.realm.as_str();
        let p = &token.principal;
        if !rule.issuers.is_empty() && !rule.issuers.iter().any(|id| *id == *token.issuer.id) {
            let message = "the access token issuer is not accepted for this resource";
            self.step("require", || {
                format!("issuer {:?} not in {:?}", token.issuer.id, rule.issuers)
            });
            let www = challenge::invalid_token(realm, message);
            return Some(self.deny_with(
                401,
                Reason::IssuerNotAccepted,
                message,
                rule,
                token,
                Some(www),
            ));
        }
        // Set only for a bound token, whose certificate was the one presented (else refused).
        if effective.certificate_bound && !matches!(self.certificate, Some(Ok(_))) {
            let message = "this resource takes only access tokens bound to the client \
                           certificate (RFC 8705), and this one is a bearer token";
            self.step("require", || message.to_owned());
            let www = challenge::invalid_token(realm, message);
            return Some(self.deny_with(
                401,
                Reason::TokenNotBound,
                message,
                rule,
                token,
                Some(www),
            ));
        }
        let missing: Vec<String> = effective
            .scopes
            .iter()
            .filter(|s| !p.scopes.iter().any(|have| **have == ***s))
            .map(|s| s.to_string())
            .collect();
        if !missing.is_empty() {
            let message = format!("missing scope {}", missing.join(" "));
            self.step("require", || message.clone());
            let required: Vec<String> = effective.scopes.iter().map(|s| s.to_string()).collect();
            let www = challenge::insufficient_scope(realm, &message, &required);
            return Some(self.deny_with(
                403,
                Reason::MissingScope,
                &message,
                rule,
                token,
                Some(www),
            ));
        }
        if let Some(role) = effective
            .roles
            .iter()
            .find(|r| !p.roles.iter().any(|have| **have == ***r))
        {
            let message = format!("missing role {role}");
            self.step("require", || message.clone());
            let www = challenge::insufficient_scope(realm, &message, &[]);
            return Some(self.deny_with(
                403,
                Reason::MissingRole,
                &message,
                rule,
                token,
                Some(www),
            ));
        }
        if let Some(c) = effective
            .claims
            .iter()
            .find(|c| !claim_matches(&token.claims, c))
        {
            let message = format!("claim {} does not have a required value", c.claim);
            self.step("require", || message.clone());
            let www = challenge::insufficient_scope(realm, &message, &[]);
            return Some(self.deny_with(
                403,
                Reason::ClaimMismatch,
                &message,
                rule,
                token,
                Some(www),
            ));
        }
        for condition in &effective.conditions {
            let (reason, message) = match condition.evaluate_readings(input, Readings::Every) {
                Ok(true) => continue,
                Ok(false) => (
                    Reason::ConditionFailed,
                    format!("condition {:?} does not hold", condition.source),
                ),
                Err(message) => (Reason::ConditionError, message),
            };
            self.step("require", || message.clone());
            let www = challenge::insufficient_scope(realm, &message, &[]);
            return Some(self.deny_with(403, reason, &message, rule, token, Some(www)));
        }
        None
    }

    fn authenticate(
        &mut self,
        rule: &'p Rule,
        token: &VerifiedToken,
        effective: &Effective<'p>,
        now: i64,
    ) -> Decision {
        let p = &token.principal;
        let missing_contexts: Vec<String> = effective
            .auth_contexts
            .iter()
            .filter(|c| !p.acrs.iter().any(|have| **have == ***c))
            .map(|c| c.to_string())
            .collect();
        let acr_values = effective.acr.as_deref().unwrap_or_default();
        if effective.acr.as_ref().is_some_and(Vec::is_empty) {
            // Refused at load for the lists a policy states; here for those a combination of
            // escalations and risk signals narrowed to nothing.
            let message = "no authentication level is acceptable to every requirement in force \
                           (their acr lists share no value)";
            self.step("require", || message.to_owned());
            return self.deny_with(
                403,
                Reason::StepUpNotExpressible,
                message,
                rule,
                token,
                None,
            );
        }
        let acr_ok = acr_values.is_empty()
            || p.acr
                .as_deref()
                .is_some_and(|acr| acr_values.contains(&acr));
        let missing_amr: Vec<&str> = effective
            .amr
            .iter()
            .copied()
            .filter(|m| !p.amr.iter().any(|have| **have == **m))
            .collect();
        // `auth_time` is within 1970..=9999 (checked when the token was verified); saturating
        // all the same, since a wrapped age would pass any `max_age`.
        let age = effective
            .max_age
            .map(|max| (max, p.auth_time.map(|t| now.saturating_sub(t))));

        let stale = match age {
            Some((_, None)) => true,
            Some((max, Some(age))) => age > i64::try_from(max).unwrap_or(i64::MAX),
            None => false,
        };
        let unmet = if let Some(first) = missing_contexts.first() {
            Some((
                Reason::MissingAuthContext,
                format!("authentication context {first} is required"),
            ))
        } else if !acr_ok {
            Some((
                Reason::AcrNotAccepted,
                format!(
                    "authentication level {} is required",
                    acr_values.join(" or ")
                ),
            ))
        } else if !missing_amr.is_empty() {
            Some((
                Reason::MissingAmr,
                format!(
                    "authentication method {} is required",
                    missing_amr.join(", ")
                ),
            ))
        } else {
            match age {
                Some((max, None)) => Some((
                    Reason::AuthTimeMissing,
                    format!(
                        "a sign-in within {max} seconds is required and the token has no auth_time"
                    ),
                )),
                Some((max, Some(age))) if age > i64::try_from(max).unwrap_or(i64::MAX) => Some((
                    Reason::AuthTooOld,
                    format!(
                        "a sign-in within {max} seconds is required; the last was {age} seconds ago"
                    ),
                )),
                _ => None,
            }
        };
        let Some((reason, message)) = unmet else {
            return self.allow(Reason::Allowed, Some(rule), Some(token));
        };
        self.step("require", || message.clone());

        let style = token.issuer.challenge;
        let mut step_up = StepUp {
            style: style.as_str(),
            auth_contexts: effective
                .auth_contexts
                .iter()
                .map(|s| s.to_string())
                .collect(),
            missing_auth_contexts: missing_contexts.clone(),
            acr_values: acr_values.iter().map(|s| s.to_string()).collect(),
            max_age: effective.max_age,
            amr: effective.amr.iter().map(|s| s.to_string()).collect(),
            claims: None,
        };
        if p.app_only {
            let message = format!("{message}, and an application token has no user to step up");
            self.step("challenge", || {
                "application token: cannot step up".to_owned()
            });
            let mut d = self.deny_with(403, Reason::AppOnlyToken, &message, rule, token, None);
            d.step_up = Some(Box::new(step_up));
            return d;
        }
        // A challenge the client can never satisfy makes it loop: refuse instead. An Entra claims
        // challenge can request an authentication context (and, by asking for one again, a fresh
        // sign-in), not an `acr` or `amr`; an RFC 9470 challenge cannot request a context. Nor
        // can an Entra challenge request an `auth_time`: Entra writes it into access tokens only
        // when the API's app registration asks for that optional claim, so a token that has every
        // context but no `auth_time` would get the same token back for ever.
        let expressible = match style {
            ChallengeStyle::Entra => {
                !missing_contexts.is_empty()
                    || (!step_up.auth_contexts.is_empty() && reason == Reason::AuthTooOld)
            }
            // RFC 9470 asks with `acr_values` and `max_age`: only a level the token lacks or a
            // sign-in too old is something to ask for. An `amr` alone gives the client nothing to
            // send (the levels it would ask for again, the token has), and its sign-in session
            // hands back the same token.
            ChallengeStyle::Rfc9470 => missing_contexts.is_empty() && (!acr_ok || stale),
            ChallengeStyle::Deny => true,
        };
        if !expressible {
            self.step("challenge", || {
                format!("a {} challenge cannot request this", style.as_str())
            });
            let message = if style == ChallengeStyle::Entra && reason == Reason::AuthTimeMissing {
                format!(
                    "{message}, which an Entra ID challenge cannot request: add the auth_time \
                     optional claim to the API's app registration"
                )
            } else {
                format!("{message}, which the issuer's challenge style cannot request")
            };
            let mut d = self.deny_with(
                403,
                Reason::StepUpNotExpressible,
                &message,
                rule,
                token,
                None,
            );
            d.step_up = Some(Box::new(step_up));
            return d;
        }
        match style {
            ChallengeStyle::Entra => {
                // Ask for the first missing context; when all are present but the sign-in is too
                // old, ask again for the first required one (its Conditional Access policy carries
                // the sign-in frequency).
                let Some(context) = missing_contexts
                    .first()
                    .or(step_up.auth_contexts.first())
                    .cloned()
                else {
                    unreachable!("an expressible Entra challenge names a context");
                };
                // Every required context is declared (checked at load), so its claims request
                // was rendered then.
                let (json, b64) = match self.policy.auth_contexts.get(&context) {
                    Some(c) => (c.claims_request.clone(), c.claims_base64.clone()),
                    None => {
                        let json = challenge::entra_claims_request(&context);
                        let b64 = challenge::encode_claims(&json);
                        (json, b64)
                    }
                };
                step_up.claims = Some((json, b64.clone()));
                if !token.client_is_challenge_capable() {
                    self.step("challenge", || {
                        "client did not declare cp1 in xms_cc: no claims challenge".to_owned()
                    });
                    let message = format!(
                        "{message}, and the client cannot handle a claims challenge (xms_cc lacks cp1)"
                    );
                    let mut d =
                        self.deny_with(403, Reason::ClientNotCapable, &message, rule, token, None);
                    d.step_up = Some(Box::new(step_up));
                    return d;
                }
                let www = challenge::entra_claims(&token.issuer.entra, &b64);
                self.step("challenge", || {
                    format!("Entra claims challenge for {context}")
                });
                self.step_up(reason, &message, rule, token, www, step_up)
            }
            ChallengeStyle::Rfc9470 => {
                let www = challenge::insufficient_user_authentication(
                    &self.policy.realm,
                    &message,
                    &step_up.acr_values,
                    step_up.max_age,
                );
                self.step("challenge", || {
                    "RFC 9470 insufficient_user_authentication".to_owned()
                });
                self.step_up(reason, &message, rule, token, www, step_up)
            }
            ChallengeStyle::Deny => {
                self.step("challenge", || {
                    "issuer configured to deny instead of challenging".to_owned()
                });
                let mut d = self.deny_with(403, reason, &message, rule, token, None);
                d.step_up = Some(Box::new(step_up));
                d
            }
        }
    }

    /// Whether the request comes with the client certificate its token is bound to (`bound`):
    /// `None` when it does, else the 401 denial.
    fn certificate_binding(
        &mut self,
        request: &AccessRequest,
        bound: &Thumbprint,
    ) -> Option<Decision> {
        let presented = request
            .client_certificate
            .as_ref()
            .map(ClientCertificate::thumbprint);
        self.certificate = presented;
        let (reason, message) = match presented {
            Some(Ok(presented)) => {
                if presented == *bound {
                    self.step("binding", || {
                        format!(
                            "the token is bound to the client certificate presented (x5t#S256 {})",
                            thumbprint::encode(bound)
                        )
                    });
                    return None;
                }
                (
                    Reason::ClientCertificateMismatch,
                    "the access token is bound to another client certificate than the one this \
                     request was made with",
                )
            }
            None => (
                Reason::ClientCertificateMissing,
                "the access token is bound to a client certificate, and the request was made \
                 without one",
            ),
            Some(Err(CertificateProblem::TooLarge)) => (
                Reason::ClientCertificateInvalid,
                "the access token is bound to a client certificate, and the request's is too \
                 large to read",
            ),
            Some(Err(CertificateProblem::NotOnePem)) => (
                Reason::ClientCertificateInvalid,
                "the access token is bound to a client certificate, and the request's is not \
                 one PEM certificate",
            ),
        };
        self.step("binding", || message.to_owned());
        let www = challenge::invalid_token(&self.policy.realm, message);
        Some(self.deny(401, reason, message, None, Some(www)))
    }

    fn token_missing(&mut self) -> Decision {
        let message = "an access token is required";
        let www = challenge::no_token(&self.policy.realm);
        self.deny(401, Reason::TokenMissing, message, None, Some(www))
    }

    fn base(
        &mut self,
        outcome: Outcome,
        reason: Reason,
        message: impl Into<Cow<'static, str>>,
        status: u16,
    ) -> Decision {
        Decision {
            token_fingerprint: self.fingerprint.take(),
            token_cached: self.token_cached,
            explain: self.explain.take().unwrap_or_default(),
            ..Decision::new(outcome, reason, message, status)
        }
    }

    fn deny(
        &mut self,
        status: u16,
        reason: Reason,
        message: &str,
        rule: Option<&Rule>,
        www: Option<String>,
    ) -> Decision {
        let mut d = self.base(Outcome::Deny, reason, message.to_owned(), status);
        d.rule = rule.map(|r| local_copy(&r.id));
        d.www_authenticate = www;
        d
    }

    fn deny_with(
        &mut self,
        status: u16,
        reason: Reason,
        message: &str,
        rule: &Rule,
        token: &VerifiedToken,
        www: Option<String>,
    ) -> Decision {
        let mut d = self.deny(status, reason, message, Some(rule), www);
        d.principal = Some(token.principal.clone());
        d
    }

    fn step_up(
        &mut self,
        reason: Reason,
        message: &str,
        rule: &Rule,
        token: &VerifiedToken,
        www: String,
        step_up: StepUp,
    ) -> Decision {
        let mut d = self.base(Outcome::StepUp, reason, message.to_owned(), 401);
        d.rule = Some(local_copy(&rule.id));
        d.www_authenticate = Some(www);
        d.step_up = Some(Box::new(step_up));
        d.principal = Some(token.principal.clone());
        d
    }

    fn allow(
        &mut self,
        reason: Reason,
        rule: Option<&Rule>,
        token: Option<&VerifiedToken>,
    ) -> Decision {
        let message = match reason {
            Reason::AnonymousAllowed => "the route allows anonymous access",
            Reason::DefaultAllowed => {
                "no rule matched; the policy allows any valid token by default"
            }
            _ => "the token meets every requirement",
        };
        self.step("decision", || message.to_owned());
        let mut d = self.base(Outcome::Allow, reason, message, 200);
        d.rule = rule.map(|r| local_copy(&r.id));
        if let Some(token) = token {
            d.identity_headers = identity_headers(self.policy, rule, token);
            d.principal = Some(token.principal.clone());
        } else if let Some(rule) = rule {
            d.identity_headers = self
                .policy
                .upstream
                .identity_headers
                .iter()
                .filter(|(_, source)| *source == HeaderSource::Rule)
                .map(|(name, _)| (local_copy(name), local_copy(&rule.id)))
                .collect();
        }
        d
    }
}

/// The rule found for a request, with its index; or the rule whose condition failed to evaluate.
/// The path a search for a rule reads: in lower case (which the rule index files globs under,
/// and gRPC names are matched against), and for the reading in the path's own case, the path as
/// sent, which globs as written are matched against (`upstream.path_case`).
#[derive(Debug, Clone, Copy, Default)]
struct PathReading<'a> {
    lowered: Option<&'a str>,
    in_case: Option<&'a str>,
    /// A path with a trailing slash read as servers that tell `/a/` from `/a` read it: only
    /// the globs that take a trailing slash match it ([`PathGlob::takes_trailing_slash`]).
    slash_apart: bool,
    /// A HEAD read as the GET whose handler servers answer it with.
    head_as_get: bool,
}

/// The message of an `ambiguous_path` denial.
const AMBIGUOUS_PATH: &str = "the path picks another rule read in its own letter case than in \
                              lower case, and the upstream may read it either way; set \
                              upstream.path_case to how the upstream routes";

/// The message of an `ambiguous_path` denial for a trailing slash.
const AMBIGUOUS_SLASH: &str = "the path ends with / and picks another rule than the path without \
                               it, and upstreams differ on whether they are one path; write the \
                               glob with the trailing slash (/a/) or as /a/** if the rule is \
                               meant for both";

/// The message of the `ambiguous_path` denial of a HEAD that two rules take as a HEAD and as a
/// GET, one asking a step-up and the other allowing it or asking one too.
const AMBIGUOUS_HEAD: &str = "a matcher takes the HEAD and not the GET, another rule takes the \
                              GET and asks a step-up the first may not (or the other way \
                              round), and most servers answer a HEAD with their GET handler; \
                              match GET (which takes HEAD) rather than HEAD alone";

/// The message of an `ambiguous_path` denial for an extension.
const AMBIGUOUS_EXTENSION: &str = "the path's last segment has an extension and picks another \
                                   rule than the path without it, and some upstreams serve one \
                                   from the other's route (Rails, Spring MVC up to 5.2); match \
                                   both (/a and /a.*), or set upstream.format_suffix: exact if \
                                   the upstream routes the path as sent";

/// The first enforced rule a search from the start settles on (shadow rules passed over and not
/// recorded): its index, or the index of the rule whose condition failed.
fn first_enforced(
    policy: &Policy,
    request: &AccessRequest,
    path: PathReading<'_>,
    input: &CelInput<'_>,
) -> Result<Option<usize>, usize> {
    let mut from = 0;
    loop {
        match find_rule(policy, from, request, path, input) {
            Ok(Some((at, rule))) | Err((at, rule, _)) if rule.shadow => from = at + 1,
            Ok(found) => return Ok(found.map(|(at, _)| at)),
            Err((at, _, _)) => return Err(at),
        }
    }
}

/// The message of an `ambiguous_host` denial.
const AMBIGUOUS_HOST: &str = "the host has a port or a trailing dot, and a host rule matches it \
                              only without them while the proxy routes it with them; name the \
                              host with its port in the rule, or set upstream.host_port: ignored \
                              if the proxy strips or ignores ports";

type Found<'p> = Result<Option<(usize, &'p Rule)>, (usize, &'p Rule, Undecided)>;

/// Why a matcher could not tell whether it matches the request.
#[derive(Debug)]
enum Undecided {
    /// Its `when` failed to evaluate, or its readings disagreed.
    Condition(String),
    /// Its hosts match the host without its port or trailing dot but not as sent (or the other
    /// way round), and the proxy routes it as sent ([`host_matches`]).
    Host,
}

/// First rule from index `from` with a matching matcher (`path` is normalised and lower-cased),
/// with its index. A condition error denies (returning the rule): skipping the rule could let a
/// later, weaker rule decide. Only the matchers the rule index files under the request's operation
/// and path are tried, in policy order: the answer is the plain scan's ([`scan_rules`]).
fn find_rule<'p>(
    policy: &'p Policy,
    from: usize,
    request: &AccessRequest,
    path: PathReading<'_>,
    input: &CelInput<'_>,
) -> Found<'p> {
    // The candidates' buffer is the thread's own, reused: no allocation per request.
    thread_local! {
        static CANDIDATES: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut candidates = CANDIDATES.take();
    policy
        .index
        .candidates(request.operation.as_deref(), path.lowered, &mut candidates);
    let found = candidates.iter().find_map(|&entry| {
        let (at, m) = policy.index.entry(entry);
        let rule = &policy.rules[at];
        (at >= from)
            .then(|| {
                let routed = policy.upstream.host_port_routed;
                tried(at, rule, &rule.matchers[m], request, path, input, routed)
            })
            .flatten()
    });
    CANDIDATES.set(candidates);
    found.unwrap_or(Ok(None))
}

/// What trying one matcher of rule `at` settles: the rule, or its condition's error; `None` to
/// go on.
fn tried<'p>(
    at: usize,
    rule: &'p Rule,
    matcher: &Matcher,
    request: &AccessRequest,
    path: PathReading<'_>,
    input: &CelInput<'_>,
    host_port_routed: bool,
) -> Option<Found<'p>> {
    match matches(matcher, request, path, input, host_port_routed) {
        Ok(true) => Some(Ok(Some((at, rule)))),
        Ok(false) => None,
        Err(undecided) => Some(Err((at, rule, undecided))),
    }
}

/// [`find_rule`] by trying every matcher of every rule in order: what the index must agree with.
#[cfg(test)]
fn scan_rules<'p>(
    policy: &'p Policy,
    from: usize,
    request: &AccessRequest,
    path: PathReading<'_>,
    input: &CelInput<'_>,
) -> Found<'p> {
    for (at, rule) in policy.rules.iter().enumerate().skip(from) {
        for matcher in &rule.matchers {
            let routed = policy.upstream.host_port_routed;
            if let Some(found) = tried(at, rule, matcher, request, path, input, routed) {
                return found;
            }
        }
    }
    Ok(None)
}

fn matches(
    m: &Matcher,
    request: &AccessRequest,
    path: PathReading<'_>,
    input: &CelInput<'_>,
    host_port_routed: bool,
) -> Result<bool, Undecided> {
    if let Some(op) = &m.operation
        && !request.operation.as_deref().is_some_and(|o| op.matches(o))
    {
        return Ok(false);
    }
    let http = request.http.as_ref();
    if !m.methods.is_empty()
        && !http.is_some_and(|h| {
            let method = if path.head_as_get && h.method == "HEAD" {
                "GET"
            } else {
                &h.method
            };
            m.methods.iter().any(|m| m == method)
        })
    {
        return Ok(false);
    }
    // An ambiguous host only counts once the matcher's other fields match.
    let mut host_undecided = false;
    if !m.hosts.is_empty() {
        match http.map(|h| host_matches(&m.hosts, h, host_port_routed)) {
            Some(Some(true)) => {}
            Some(None) => host_undecided = true,
            None | Some(Some(false)) => return Ok(false),
        }
    }
    if !m.paths.is_empty() {
        let globs = m
            .paths
            .iter()
            .filter(|g| !path.slash_apart || g.takes_trailing_slash());
        let matched = match (path.in_case, path.lowered) {
            (Some(in_case), _) => globs.clone().any(|g| g.matches_in_case(in_case)),
            (None, Some(lowered)) => globs.clone().any(|g| g.matches(lowered)),
            (None, None) => false,
        };
        if !matched {
            return Ok(false);
        }
    }
    if let Some(grpc) = &m.grpc {
        let Some((service, method)) = path
            .lowered
            .and_then(|p| p.strip_prefix('/')?.split_once('/'))
        else {
            return Ok(false);
        };
        if method.contains('/') || !grpc.service.matches(service) {
            return Ok(false);
        }
        if grpc.method.as_ref().is_some_and(|w| !w.matches(method)) {
            return Ok(false);
        }
    }
    if host_undecided {
        return Err(Undecided::Host);
    }
    match &m.when {
        None => Ok(true),
        // The same answer in each search of the rules (one per reading of the path).
        Some(condition) => condition
            .evaluate_once(input, Readings::Agree)
            .map_err(Undecided::Condition),
    }
}

/// Whether one of `hosts` matches the request's host; `None` when its two readings disagree.
///
/// Patterns match the host without its port and trailing dot (in lower case), as resolvers and
/// most servers read it, except a pattern that names a port or ends in a dot
/// (`api.example.com:8443`, `api.example.com:*`), which matches the host as routed. But Envoy
/// picks its virtual host with the port and dot as sent (unless told to strip or ignore them):
/// to it, `www.example.com:8443` is not `www.example.com` and goes to another virtual host, such
/// as a `*` one. So when the request's host has a port or dot, every pattern is also matched
/// against the host as the proxy routes it, and the two readings must agree: a rule for
/// `www.example.com` that would let such a request through by its weaker requirement, while
/// Envoy serves it from another virtual host, decides nothing. The proxy routes the host as sent
/// (`routed`, `upstream.host_port`), or without its port but with its dot (`ignored`: Envoy's
/// `ignore_port_in_host_matching` leaves the dot, which only `strip_trailing_host_dot` removes,
/// and then stepgate never sees it).
fn host_matches(
    hosts: &[crate::policy::pattern::HostPattern],
    http: &crate::request::HttpAttributes,
    routed: bool,
) -> Option<bool> {
    let route_on = http.host_as_routed(routed);
    // A pattern that names a port or a dot asks for the host as routed, in either reading.
    let plain = hosts.iter().any(|w| {
        if w.as_routed {
            w.matches(route_on)
        } else {
            w.matches(&http.host)
        }
    });
    if route_on == http.host {
        return Some(plain);
    }
    let by_route = hosts.iter().any(|w| w.matches(route_on));
    (by_route == plain).then_some(plain)
}

/// The claim equals one of the values, or (for an array claim) contains one of them.
fn claim_matches(claims: &serde_json::Map<String, Value>, requirement: &ClaimRequirement) -> bool {
    match claims.get(&requirement.claim) {
        None => false,
        Some(Value::Array(items)) => items.iter().any(|item| requirement.any_of.contains(item)),
        Some(value) => requirement.any_of.contains(value),
    }
}

fn identity_headers(
    policy: &Policy,
    rule: Option<&Rule>,
    token: &VerifiedToken,
) -> Vec<(Arc<str>, Arc<str>)> {
    let p = &token.principal;
    // A list of one (the usual `acrs`, `amr` or `roles`) is shared rather than joined anew.
    let join = |v: &[Arc<str>]| match v {
        [] => None,
        [one] if !needs_escape(one, true) => Some(Arc::clone(one)),
        many => Some(Arc::from(list_value(many.iter().map(|item| &**item)))),
    };
    policy
        .upstream
        .identity_headers
        .iter()
        .filter_map(|(name, source)| {
            let single = |value: Option<Arc<str>>| value.map(single_value);
            let value: Arc<str> = match source {
                HeaderSource::Subject => {
                    single(Some(Arc::clone(&p.subject)).filter(|s| !s.is_empty()))
                }
                HeaderSource::Issuer => single(Some(Arc::clone(&p.issuer))),
                HeaderSource::IssuerId => Some(Arc::clone(&p.issuer_id)),
                HeaderSource::Tenant => single(p.tenant.clone()),
                HeaderSource::ClientId => single(p.client_id.clone()),
                HeaderSource::Acrs => join(&p.acrs),
                HeaderSource::Acr => single(p.acr.clone()),
                HeaderSource::Amr => join(&p.amr),
                HeaderSource::Scopes => join(&p.scopes),
                HeaderSource::Roles => join(&p.roles),
                HeaderSource::AuthTime => p.auth_time.map(|t| Arc::from(t.to_string())),
                HeaderSource::Rule => rule.map(|r| local_copy(&r.id)),
                HeaderSource::Claim(claim) => match token.claims.get(claim) {
                    Some(Value::String(s)) => single(Some(Arc::from(s.as_str()))),
                    Some(Value::Number(n)) => Some(Arc::from(n.to_string())),
                    Some(Value::Bool(b)) => Some(Arc::from(b.to_string())),
                    Some(Value::Array(items)) => {
                        let words: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                        (!words.is_empty()).then(|| Arc::from(list_value(words.into_iter())))
                    }
                    _ => None,
                },
            }?;
            Some((local_copy(name), value))
        })
        .collect()
}

/// A claim's value as a header value. Its control characters (a header line injected, or
/// `admin\u{85}` read as `admin`) and `%` are percent-encoded: the value stays printable and
/// names exactly one claim value.
fn single_value(value: Arc<str>) -> Arc<str> {
    if needs_escape(&value, false) {
        let mut escaped = String::with_capacity(value.len() + 8);
        push_escaped(&mut escaped, &value, false);
        Arc::from(escaped)
    } else {
        value
    }
}

/// A character some reader of a header value takes for a space: Unicode white space (what Go's
/// `strings.Fields` and `TrimSpace` and Python's `split()` and `strip()` split and trim on),
/// and the byte-order mark.
fn spacey(c: char) -> bool {
    c.is_whitespace() || c == '\u{feff}'
}

/// Whether `text` has something [`push_escaped`] encodes: `%` or a control character, or a space
/// anywhere in a list item and at either end of a single value (parsers strip it there, and
/// `admin ` would read as `admin`).
fn needs_escape(text: &str, list_item: bool) -> bool {
    if text.is_ascii() {
        // Nearly every claim value: one branch-free pass over its bytes. The ASCII spaces are
        // a control character (tab to carriage return) or ` `.
        let space = |b: u8| b == b' ' || (b'\t'..=b'\r').contains(&b);
        let bytes = text.as_bytes();
        let found = bytes.iter().fold(false, |found, &b| {
            found | (b == b'%') | (b < 0x20) | (b == 0x7f) | (list_item & (b == b' '))
        });
        return found
            || bytes.first().copied().is_some_and(space)
            || bytes.last().copied().is_some_and(space);
    }
    text.contains(|c: char| c == '%' || c.is_control() || (list_item && spacey(c)))
        || text.starts_with(spacey)
        || text.ends_with(spacey)
}

/// A list's items as one header value, space-separated. An item holding a space (one role named
/// `Order Admin`, or `Order\u{a0}Admin`), a percent sign or a control character has them
/// percent-encoded (`Order%20Admin`), so that it can never read as two items (the roles `Order`
/// and `Admin`) to an upstream that splits the value.
fn list_value<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for item in items {
        if !out.is_empty() {
            out.push(' ');
        }
        push_escaped(&mut out, item, true);
    }
    out
}

/// Appends `text` with `%`, control characters and spaces (of any kind, [`spacey`])
/// percent-encoded, byte by byte of their UTF-8: every space of a list item, a single value's at
/// either end.
fn push_escaped(out: &mut String, text: &str, list_item: bool) {
    use std::fmt::Write as _;
    let start = text.len() - text.trim_start_matches(spacey).len();
    let end = text.trim_end_matches(spacey).len().max(start);
    for (at, c) in text.char_indices() {
        let space = spacey(c) && (list_item || at < start || at >= end);
        if c == '%' || c.is_control() || space {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

#[cfg(test)]
mod index_property;

#[cfg(test)]
mod escape_property {
    use proptest::prelude::*;

    use super::{needs_escape, spacey};

    /// What [`needs_escape`] must say, by characters: its fast path for ASCII agrees.
    fn by_characters(text: &str, list_item: bool) -> bool {
        text.contains(|c: char| c == '%' || c.is_control() || (list_item && spacey(c)))
            || text.starts_with(spacey)
            || text.ends_with(spacey)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn the_ascii_pass_agrees_with_the_characters(
            text in prop::collection::vec(
                prop::sample::select(vec![' ', '\t', '\n', '\u{b}', '\u{c}', '\r', '\u{1c}', '\u{0}',
                    '\u{7f}', '%', 'a', 'Z', '-', '~', '\u{85}', '\u{a0}', '\u{feff}', 'é']),
                0..8,
            ).prop_map(String::from_iter),
            list_item in any::<bool>(),
        ) {
            prop_assert_eq!(needs_escape(&text, list_item), by_characters(&text, list_item));
        }
    }
}
