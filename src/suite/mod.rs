//! Policy test suites (`stepgate test`): YAML files of cases — a request, a caller, a fixed time
//! and the decision expected — run against a policy offline, with tokens signed by throwaway keys
//! ([`signer`]) installed for the policy's issuers.
//!
//! A case fails when any expected field differs; its report shows expected against got, with the
//! engine's explain trace. The run also says which rules and escalations no case reached.

pub mod report;
mod schema;
pub mod signer;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
};

use serde_json::{Map, Value, json};

pub use schema::SuiteFile;
use schema::{CaseConfig, ChallengeConfig, OutcomeConfig, PrincipalConfig, TokenConfig};
use signer::Signer;

use crate::{
    api::v1::{DecideRequest, HttpRequest, decide_request::Credential},
    config::ConfigError,
    decision::{self, Decision, ExplainStep, Outcome, Reason},
    identity::{
        ClientCertificate,
        issuer::{Discovered, IssuerName, SubjectClaim, Tenants},
        thumbprint,
    },
    policy::Policy,
    request::Peer,
    server::decide::access_request,
};

/// The tenant a `{tenantid}` issuer's token is given when the case names none and the issuer
/// accepts any.
const DEFAULT_TENANT: &str = "00000000-0000-4000-8000-000000000001";

/// A suite file that cannot run: the file and the field path of the first problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {error}")]
pub struct SuiteError {
    pub file: String,
    pub error: ConfigError,
}

/// Parses a suite file's text.
pub fn parse(file: &Path, text: &str) -> Result<SuiteFile, SuiteError> {
    crate::config::parse_yaml(text).map_err(|error| SuiteError {
        file: file.display().to_string(),
        error,
    })
}

/// What one case did.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: PathBuf,
    pub index: usize,
    pub name: String,
    /// Expected field, expected value, got value: one per field that differs.
    pub mismatches: Vec<(String, String, String)>,
    /// The decision in one line.
    pub got: String,
    pub explain: Vec<ExplainStep>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Runs suites against one policy: its issuers get throwaway keys.
pub struct Runner {
    policy: Policy,
    signers: HashMap<String, Signer>,
    /// Rules a case reached (the deciding rule), and (rule, escalation index) whose condition held.
    rules_reached: BTreeSet<String>,
    escalations_reached: BTreeSet<(String, usize)>,
}

/// The header `typ` a case's token has unless it says otherwise: what the issuer's provider
/// sends. Entra ID types its access tokens `JWT`, never `at+jwt`, so a case cannot pass an
/// Entra issuer that requires `at+jwt` with a token Entra would never issue; an RFC 9068
/// provider set up for `require_at_jwt` sends `at+jwt`.
fn default_typ(issuer: &crate::identity::Issuer) -> &'static str {
    if issuer.require_at_jwt && !issuer.is_entra() {
        "at+jwt"
    } else {
        "JWT"
    }
}

impl Runner {
    /// Installs a throwaway key as each issuer's only key (and, for an issuer known only by its
    /// discovery document, a stand-in `iss`).
    pub fn new(mut policy: Policy) -> Result<Self, String> {
        // Each case is decided at its own `now`, and two cases with the same claims sign the same
        // token: a verification cached by one would answer the other (a token not valid yet at
        // the second case's time, allowed). No cache: every case verifies its own token.
        policy.token_cache = crate::identity::TokenCache::new(
            0,
            0,
            std::time::Duration::ZERO,
            policy.token_cache.keeps().clone(),
        );
        let mut signers = HashMap::new();
        for issuer in policy.issuers.iter() {
            if issuer.name == IssuerName::Discovered {
                let iss = format!("https://{}.issuer.test.stepgate.invalid", issuer.id);
                issuer.set_discovered(Discovered {
                    name: IssuerName::Exact(iss.clone()),
                    issuer: iss,
                    jwks_uri: String::new(),
                });
            }
            signers.insert(issuer.id.to_string(), Signer::install(issuer)?);
        }
        Ok(Self {
            policy,
            signers,
            rules_reached: BTreeSet::new(),
            escalations_reached: BTreeSet::new(),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Checks a suite's references against the policy (issuer ids, rule ids, reason codes)
    /// before anything runs.
    pub fn check(&self, file: &Path, suite: &SuiteFile) -> Result<(), SuiteError> {
        let fail = |path: String, message: String| SuiteError {
            file: file.display().to_string(),
            error: ConfigError::new(path, message),
        };
        if suite.cases.is_empty() {
            return Err(fail("cases".into(), "list at least one case".into()));
        }
        for (i, case) in suite.cases.iter().enumerate() {
            let at = |field: &str| format!("cases[{i}].{field}");
            let issuer = match (&case.token, &case.principal) {
                (Some(_), Some(_)) => {
                    return Err(fail(
                        at("principal"),
                        "give the caller as `token` or as `principal`, not both".into(),
                    ));
                }
                (Some(t), None) => Some((at("token.issuer"), &t.issuer)),
                (None, Some(p)) => Some((at("principal.issuer"), &p.issuer)),
                (None, None) => None,
            };
            if let Some((path, id)) = issuer
                && self.policy.issuers.by_id(id).is_none()
            {
                let ids: Vec<&str> = self.policy.issuers.iter().map(|i| &*i.id).collect();
                return Err(fail(
                    path,
                    format!("no issuer has id {id:?} (the policy has {ids:?})"),
                ));
            }
            if let Some(rule) = case.expect.rule.as_deref()
                && !rule.is_empty()
                && self.policy.rule(rule).is_none()
            {
                return Err(fail(
                    at("expect.rule"),
                    format!("the policy has no rule {rule:?}"),
                ));
            }
            if let Some(reason) = case.expect.reason.as_deref()
                && !Reason::ALL.iter().any(|r| r.as_str() == reason)
            {
                return Err(fail(
                    at("expect.reason"),
                    format!("{reason:?} is not a reason code (docs/policy.md lists them)"),
                ));
            }
            if let Some(t) = &case.request.client_certificate
                && thumbprint::decode(t).is_none()
            {
                return Err(fail(
                    at("request.client_certificate"),
                    format!(
                        "expected the certificate's x5t#S256 (43 characters of unpadded \
                         base64url: the SHA-256 of its DER), got {t:?}"
                    ),
                ));
            }
            if case.request.operation.is_none() && case.request.path.is_none() {
                return Err(fail(
                    at("request"),
                    "give an `operation` (a Decide call) or a `path` (an HTTP request)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Runs every case of a checked suite.
    pub fn run(&mut self, file: &Path, suite: &SuiteFile) -> Result<Vec<CaseResult>, SuiteError> {
        let mut results = Vec::with_capacity(suite.cases.len());
        for (index, case) in suite.cases.iter().enumerate() {
            let now = case
                .now
                .or(suite.now)
                .map_or_else(crate::server::authorizer::unix_now, |t| t.0);
            let token = self.token_for(case, now).map_err(|message| SuiteError {
                file: file.display().to_string(),
                error: ConfigError::new(format!("cases[{index}]"), message),
            })?;
            let decision = self.decide(case, token, now);
            self.cover(&decision);
            results.push(CaseResult {
                file: file.to_owned(),
                index,
                name: case.name.clone(),
                mismatches: compare(case, &decision),
                got: describe(&decision),
                explain: decision.explain.clone(),
            });
        }
        Ok(results)
    }

    /// Rules no case reached, and escalations (`rule escalate[i]: condition`) whose condition
    /// never held.
    pub fn uncovered(&self) -> (Vec<String>, Vec<String>) {
        let rules = self
            .policy
            .rules
            .iter()
            .filter(|r| !self.rules_reached.contains(&*r.id))
            .map(|r| r.id.to_string())
            .collect();
        let mut escalations = Vec::new();
        for rule in &self.policy.rules {
            for (i, e) in rule.escalate.iter().enumerate() {
                if !self.escalations_reached.contains(&(rule.id.to_string(), i)) {
                    escalations.push(format!("{} escalate[{i}]: {}", rule.id, e.when.source));
                }
            }
        }
        (rules, escalations)
    }

    fn cover(&mut self, decision: &Decision) {
        for shadow in &decision.shadow {
            match shadow.escalation {
                None => self.rules_reached.insert(shadow.rule.to_string()),
                Some(i) => self
                    .escalations_reached
                    .insert((shadow.rule.to_string(), i)),
            };
        }
        let Some(rule_id) = decision.rule.as_deref() else {
            return;
        };
        self.rules_reached.insert(rule_id.to_owned());
        let Some(rule) = self.policy.rule(rule_id) else {
            return;
        };
        for step in decision.explain.iter().filter(|s| s.stage == "escalate") {
            for (i, e) in rule.escalate.iter().enumerate() {
                let source = format!("{:?}", e.when.source);
                if step.detail.starts_with(&format!("{source} holds"))
                    || (step.detail.starts_with(&source) && step.detail.contains("(fail closed)"))
                {
                    self.escalations_reached.insert((rule_id.to_owned(), i));
                }
            }
        }
    }

    /// The token the case presents, signed with its issuer's throwaway key.
    fn token_for(&self, case: &CaseConfig, now: i64) -> Result<Option<String>, String> {
        let (issuer_id, claims, forge, typ) = match (&case.token, &case.principal) {
            (Some(t), _) => (
                &t.issuer,
                self.token_claims(t, now)?,
                t.forged,
                t.typ.as_deref(),
            ),
            (None, Some(p)) => (&p.issuer, self.principal_claims(p, now)?, false, None),
            (None, None) => return Ok(None),
        };
        let signer = &self.signers[issuer_id.as_str()];
        let typ = match (typ, self.policy.issuers.by_id(issuer_id)) {
            (Some(typ), _) => typ,
            (None, Some(issuer)) => default_typ(issuer),
            (None, None) => "JWT",
        };
        signer.sign(&claims, typ, forge).map(Some)
    }

    /// The registered claims a token of `issuer_id` needs (`iss`, `aud`, times), under `extra`.
    fn base_claims(
        &self,
        issuer_id: &str,
        now: i64,
        lifetime: i64,
        tenant: Option<&str>,
    ) -> Result<Map<String, Value>, String> {
        let issuer = self
            .policy
            .issuers
            .by_id(issuer_id)
            .ok_or_else(|| format!("no issuer {issuer_id:?}"))?;
        let mut claims = Map::new();
        let iss = match &issuer.name {
            IssuerName::Exact(iss) => iss.clone(),
            IssuerName::Template { prefix, suffix } => {
                let tenant = match (tenant, &issuer.tenants) {
                    (Some(t), _) => t.to_owned(),
                    (None, Tenants::Only(list)) => list.iter().next().cloned().unwrap_or_default(),
                    (None, _) => DEFAULT_TENANT.to_owned(),
                };
                claims.insert("tid".into(), json!(tenant));
                format!("{prefix}{tenant}{suffix}")
            }
            IssuerName::Discovered => issuer
                .discovered()
                .map(|d| d.issuer.clone())
                .unwrap_or_default(),
        };
        claims.insert("iss".into(), json!(iss));
        claims.insert(
            "aud".into(),
            json!(issuer.audiences.first().cloned().unwrap_or_default()),
        );
        claims.insert("sub".into(), json!("test-user"));
        if issuer.subject_claim == SubjectClaim::Oid {
            claims.insert("oid".into(), json!("test-user"));
        }
        claims.insert("iat".into(), json!(now));
        claims.insert("nbf".into(), json!(now));
        claims.insert("exp".into(), json!(now + lifetime));
        Ok(claims)
    }

    /// The claim that names the subject for issuer `issuer_id` (`sub` for an unknown one).
    fn subject_claim(&self, issuer_id: &str) -> SubjectClaim {
        self.policy
            .issuers
            .by_id(issuer_id)
            .map_or(SubjectClaim::Sub, |issuer| issuer.subject_claim)
    }

    fn token_claims(&self, t: &TokenConfig, now: i64) -> Result<Value, String> {
        let tenant = t.claims.get("tid").and_then(Value::as_str);
        let lifetime = t.lifetime.map_or(3600, |s| s.0 as i64);
        let lifetime = if t.expired { -3600 } else { lifetime };
        let mut claims = self.base_claims(&t.issuer, now, lifetime, tenant)?;
        if let Some(age) = t.auth_age {
            claims.insert("auth_time".into(), json!(now - age.0 as i64));
        }
        for (k, v) in &t.claims {
            claims.insert(k.clone(), v.clone());
        }
        // A `sub` given for an issuer that names the subject by `oid` is that subject too, unless
        // the case gives an `oid` of its own.
        if self.subject_claim(&t.issuer) == SubjectClaim::Oid
            && !t.claims.contains_key("oid")
            && let Some(sub) = t.claims.get("sub")
        {
            claims.insert("oid".into(), sub.clone());
        }
        Ok(Value::Object(claims))
    }

    fn principal_claims(&self, p: &PrincipalConfig, now: i64) -> Result<Value, String> {
        let mut claims = self.base_claims(&p.issuer, now, 3600, p.tenant.as_deref())?;
        let subject_claim = self.subject_claim(&p.issuer);
        let mut put = |k: &str, v: Value| {
            claims.insert(k.to_owned(), v);
        };
        // The subject under the claim its issuer names it by (and `sub` either way).
        put("sub", json!(p.subject));
        put(subject_claim.name(), json!(p.subject));
        if let Some(t) = &p.tenant {
            put("tid", json!(t));
        }
        if let Some(c) = &p.client_id {
            put("azp", json!(c));
        }
        for (name, values) in [
            ("acrs", &p.acrs),
            ("amr", &p.amr),
            ("roles", &p.roles),
            ("xms_cc", &p.xms_cc),
        ] {
            if !values.is_empty() {
                put(name, json!(values));
            }
        }
        if let Some(acr) = &p.acr {
            put("acr", json!(acr));
        }
        if p.app_only {
            put("idtyp", json!("app"));
        } else {
            // A user's token carries delegated scopes, if only an empty list (Entra tells an
            // application's token by their absence).
            put("scp", json!(p.scopes.join(" ")));
        }
        put(
            "auth_time",
            json!(now - p.auth_age.map_or(0, |s| s.0 as i64)),
        );
        Ok(Value::Object(claims))
    }

    fn decide(&self, case: &CaseConfig, token: Option<String>, now: i64) -> Decision {
        let r = &case.request;
        let http = r.path.as_ref().map(|path| HttpRequest {
            method: r.method.clone().unwrap_or_else(|| "GET".into()),
            host: r
                .host
                .clone()
                .unwrap_or_else(|| "app.test.stepgate.invalid".into()),
            path: path.clone(),
            headers: r.headers.clone().into_iter().collect(),
        });
        let request = DecideRequest {
            credential: token.map(Credential::Token),
            operation: r.operation.clone().unwrap_or_default(),
            http,
            attributes: (!r.attributes.is_empty())
                .then(|| crate::api::json_to_struct(&r.attributes)),
            explain: true,
            client_certificate: Vec::new(),
        };
        let mut access = access_request(request, self.policy.header_limits);
        // Each read already (`check`).
        access.client_certificate = r
            .client_certificate
            .as_deref()
            .and_then(thumbprint::decode)
            .map(ClientCertificate::Thumbprint);
        access.source = r.source.clone().map(|address| Peer {
            address,
            principal: String::new(),
        });
        decision::decide(&self.policy, &access, now)
    }
}

/// The expected fields that differ from `decision`: (field, expected, got).
fn compare(case: &CaseConfig, d: &Decision) -> Vec<(String, String, String)> {
    let e = &case.expect;
    let mut out = Vec::new();
    let mut check = |field: &str, expected: String, got: String| {
        if expected != got {
            out.push((field.to_owned(), expected, got));
        }
    };
    let outcome = match e.outcome {
        OutcomeConfig::Allow => Outcome::Allow,
        OutcomeConfig::StepUp => Outcome::StepUp,
        OutcomeConfig::Deny => Outcome::Deny,
    };
    check(
        "outcome",
        outcome.as_str().into(),
        d.outcome.as_str().into(),
    );
    if let Some(reason) = &e.reason {
        check("reason", reason.clone(), d.reason.as_str().into());
    }
    if let Some(rule) = &e.rule {
        check(
            "rule",
            rule.clone(),
            d.rule.as_deref().unwrap_or_default().into(),
        );
    }
    if let Some(status) = e.status {
        check("status", status.to_string(), d.http_status.to_string());
    }
    if let Some(want) = &e.shadow {
        let got: Vec<String> = d
            .shadow
            .iter()
            .map(|s| format!("{}:{}:{}", s.name(), s.outcome.as_str(), s.reason.as_str()))
            .collect();
        check(
            "shadow",
            format!("[{}]", want.join(", ")),
            format!("[{}]", got.join(", ")),
        );
    }
    if let Some(ChallengeConfig {
        auth_contexts,
        acr_values,
        max_age,
        amr,
    }) = &e.challenge
    {
        let got = d.step_up.clone().unwrap_or_default();
        let list = |v: &[String]| format!("[{}]", v.join(", "));
        if let Some(want) = auth_contexts {
            check(
                "challenge.auth_contexts",
                list(want),
                list(&got.auth_contexts),
            );
        }
        if let Some(want) = acr_values {
            check("challenge.acr_values", list(want), list(&got.acr_values));
        }
        if let Some(want) = max_age {
            check(
                "challenge.max_age",
                format!("{}s", want.0),
                got.max_age
                    .map_or_else(|| "none".into(), |s| format!("{s}s")),
            );
        }
        if let Some(want) = amr {
            check("challenge.amr", list(want), list(&got.amr));
        }
    }
    out
}

/// A decision in one line: `STEP_UP missing_auth_context (401) rule=wire-transfer asks
/// auth_contexts=[c1] max_age=900s`.
fn describe(d: &Decision) -> String {
    let mut out = format!(
        "{} {} ({}) rule={}",
        d.outcome.as_str(),
        d.reason.as_str(),
        d.http_status,
        d.rule.as_deref().unwrap_or("none")
    );
    if !d.shadow.is_empty() {
        out.push_str(&format!(
            " shadow={}",
            crate::telemetry::shadow_text(&d.shadow)
        ));
    }
    if let Some(s) = &d.step_up {
        let mut asks: BTreeMap<&str, String> = BTreeMap::new();
        if !s.auth_contexts.is_empty() {
            asks.insert("auth_contexts", format!("[{}]", s.auth_contexts.join(", ")));
        }
        if !s.acr_values.is_empty() {
            asks.insert("acr_values", format!("[{}]", s.acr_values.join(", ")));
        }
        if !s.amr.is_empty() {
            asks.insert("amr", format!("[{}]", s.amr.join(", ")));
        }
        if let Some(age) = s.max_age {
            asks.insert("max_age", format!("{age}s"));
        }
        if !asks.is_empty() {
            out.push_str(" asks");
            for (k, v) in asks {
                out.push_str(&format!(" {k}={v}"));
            }
        }
    }
    out
}
