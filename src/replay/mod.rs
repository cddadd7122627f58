//! `stepgate replay`: what would a candidate policy have done to recorded traffic?
//!
//! Each decision record ([`crate::telemetry::records`]) is decided again from its recorded facts:
//! the request, and what verification established about the token. Signatures are not verified
//! again (the record holds no token); a record of a refused token (no facts) keeps its recorded
//! answer. The report compares the baseline (a second policy, or the recorded answers) with the
//! candidate: counts and rates per rule and overall, the friction (step-ups per subject and day,
//! the share of subjects prompted), and the requests whose outcome changes.

pub mod html;
pub mod report;

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{
    decision::{self, Outcome, Reason},
    identity::{Principal, Thumbprint, VerifiedToken, issuer::Tenants, thumbprint},
    policy::Policy,
    request::{AccessRequest, Established, Headers, HttpAttributes, Peer, PresentedCredential},
};

/// One record as written (the fields replay reads), its text borrowed from the line where it can
/// be (no copy per field).
#[derive(Debug, Clone, Deserialize)]
pub struct Record<'a> {
    #[serde(borrow)]
    pub time: Cow<'a, str>,
    #[serde(default, borrow)]
    pub method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub host: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub path: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub operation: Option<Cow<'a, str>>,
    /// The fields the record holds only the beginning of (see `records::MAX_RECORDED_TEXT`).
    #[serde(default, borrow)]
    pub truncated: Vec<Cow<'a, str>>,
    #[serde(default)]
    pub attributes: Map<String, Value>,
    #[serde(default, borrow)]
    pub source: Option<Cow<'a, str>>,
    /// The thumbprint (`x5t#S256`) of the client certificate presented with a token bound to one.
    #[serde(default, borrow)]
    pub client_certificate: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub token: Option<TokenFacts<'a>>,
    #[serde(borrow)]
    pub outcome: Cow<'a, str>,
    #[serde(borrow)]
    pub reason: Cow<'a, str>,
    #[serde(default, borrow)]
    pub rule: Option<Cow<'a, str>>,
    /// The risk signals' counts the decision read that were not zero, by signal name.
    #[serde(default, borrow)]
    pub risk: BTreeMap<Cow<'a, str>, u64>,
    #[serde(default, borrow)]
    pub challenge: Option<ChallengeFacts<'a>>,
    /// How many requests a sampled ALLOW stands for (`records.allow_sample`); 1 when absent.
    #[serde(default)]
    pub weight: Option<u64>,
}

/// The largest weight a record is taken at: what one in a million ALLOWs kept gives.
const MAX_WEIGHT: u64 = 1_000_000;

/// What a recorded step-up asked for.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChallengeFacts<'a> {
    #[serde(default, borrow)]
    pub auth_contexts: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub acr_values: Vec<Cow<'a, str>>,
    #[serde(default)]
    pub max_age: Option<u64>,
    #[serde(default, borrow)]
    pub amr: Vec<Cow<'a, str>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenFacts<'a> {
    #[serde(borrow)]
    pub issuer: Cow<'a, str>,
    #[serde(borrow)]
    pub subject: Cow<'a, str>,
    #[serde(default, borrow)]
    pub tenant: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub client_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub acrs: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub acr: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub amr: Vec<Cow<'a, str>>,
    #[serde(default)]
    pub auth_time: Option<i64>,
    #[serde(default, borrow)]
    pub scopes: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub roles: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub xms_cc: Vec<Cow<'a, str>>,
    #[serde(default)]
    pub app_only: bool,
    #[serde(default)]
    pub claims: Map<String, Value>,
    /// The client certificate the token is bound to (`cnf.x5t#S256`).
    #[serde(default, borrow, rename = "x5t#S256")]
    pub x5t_s256: Option<Cow<'a, str>>,
}

/// A set of subjects (keyed by a seeded fast hash: subjects are many, and not the attacker's).
pub type Subjects = HashSet<String, foldhash::fast::RandomState>;

/// A map keyed by a seeded fast hash (the keys come from the operator's own records).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// An answer, as counted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Answer {
    pub outcome: &'static str,
    pub reason: &'static str,
    pub rule: Arc<str>,
    /// What a step-up asks for ([`asks`]); empty without one. A candidate that asks for other
    /// contexts, `acr` values, `amr` or `max_age` answers differently, with the same outcome.
    pub asks: Arc<str>,
}

/// A step-up's ask as one text: `auth_contexts c1 c3; max_age 60`.
fn asks<S: AsRef<str>>(
    auth_contexts: &[S],
    acr_values: &[S],
    max_age: Option<u64>,
    amr: &[S],
) -> Arc<str> {
    let mut parts = Vec::new();
    for (name, values) in [
        ("auth_contexts", auth_contexts),
        ("acr_values", acr_values),
        ("amr", amr),
    ] {
        if !values.is_empty() {
            let values: Vec<&str> = values.iter().map(AsRef::as_ref).collect();
            parts.push(format!("{name} {}", values.join(" ")));
        }
    }
    if let Some(max_age) = max_age {
        parts.push(format!("max_age {max_age}"));
    }
    Arc::from(parts.join("; "))
}

/// A record that could not be read: its line number and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub file: String,
    pub line: usize,
    pub error: String,
}

/// What the run found.
#[derive(Debug, Default)]
pub struct Replay {
    pub records: u64,
    /// Records of refused tokens (no facts): counted with their recorded answer on both sides.
    pub as_recorded: u64,
    /// The requests the records stand for: a sampled ALLOW stands for several.
    pub requests: u64,
    /// Records whose issuer the candidate policy does not have.
    pub unknown_issuer: u64,
    pub bad_lines: Vec<BadLine>,
    pub bad_line_count: u64,
    /// Per rule (as each side decided): answers of the baseline, then the candidate.
    pub per_rule: BTreeMap<String, [Tally; 2]>,
    pub overall: [Tally; 2],
    /// Distinct subjects (or hashes) seen, and those prompted at least once, per side.
    pub subjects: Subjects,
    pub prompted: [Subjects; 2],
    pub step_ups: [u64; 2],
    /// Days covered (first to last record).
    pub first_time: Option<i64>,
    pub last_time: Option<i64>,
    /// (baseline outcome, candidate outcome) → count.
    pub changes: BTreeMap<(&'static str, &'static str), u64>,
    /// Changed requests by what was asked (ids in paths as `*`) and the change: count and the
    /// distinct subjects.
    pub changed_requests: FastMap<(String, Answer, Answer), (u64, Subjects)>,
    /// Changed requests by subject (shown hashed).
    pub changed_subjects: FastMap<String, u64>,
    /// Step-ups by hour (unix hour) per side, for the report's chart.
    pub step_ups_by_hour: BTreeMap<i64, [u64; 2]>,
    pub requests_by_hour: BTreeMap<i64, u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub allow: u64,
    pub step_up: u64,
    pub deny: u64,
}

impl Tally {
    fn add(&mut self, outcome: &str, n: u64) {
        match outcome {
            "ALLOW" => self.allow += n,
            "STEP_UP" => self.step_up += n,
            _ => self.deny += n,
        }
    }

    pub fn total(&self) -> u64 {
        self.allow + self.step_up + self.deny
    }
}

/// Replays records against a candidate and (optionally) a baseline policy.
pub struct Replayer<'p> {
    candidate: &'p Policy,
    baseline: Option<&'p Policy>,
    replay: Replay,
    /// Bad lines kept in full (the rest are only counted).
    keep_bad: usize,
    /// The recorded rule ids, shared.
    rules: FastMap<String, Arc<str>>,
    /// The recorded reasons and outcomes as the engine's own static text.
    reasons: FastMap<&'static str, &'static str>,
}

/// At most this many distinct changed requests (method, path with ids as `*`, and the change)
/// are told apart; the others are counted as [`OTHER_REQUESTS`].
pub const MAX_CHANGED_REQUESTS: usize = 10_000;
pub const OTHER_REQUESTS: &str = "(other requests)";

/// The longest request field of a record replayed: the server cuts them at
/// [`crate::telemetry::records::MAX_RECORDED_TEXT`]. Longer, the record is not the server's, and
/// it would make a key of the tallies.
pub const MAX_FIELD_BYTES: usize = crate::telemetry::records::MAX_RECORDED_TEXT;

/// The longest rule a record names (a policy's rule ids are at most 64 bytes), and the longest
/// challenge (the policy's own contexts, `acr` values and `amr`). A subject is bounded by the
/// line only: a token's `sub` may be as long as the token.
const MAX_RULE_BYTES: usize = 1024;
const MAX_CHALLENGE_BYTES: usize = 64 * 1024;

/// At most this many distinct rules are told apart (the rules a record names are the file's);
/// the others are counted as [`OTHER_RULES`].
pub const MAX_RULES: usize = 10_000;
pub const OTHER_RULES: &str = "(other rules)";

/// The first of a record's fields that are keys of the tallies or the decision's input and
/// longer than [`MAX_FIELD_BYTES`].
fn overlong_field(record: &Record<'_>) -> Option<&'static str> {
    let fields = [
        ("method", record.method.as_deref(), MAX_FIELD_BYTES),
        ("host", record.host.as_deref(), MAX_FIELD_BYTES),
        ("path", record.path.as_deref(), MAX_FIELD_BYTES),
        ("operation", record.operation.as_deref(), MAX_FIELD_BYTES),
        ("source", record.source.as_deref(), MAX_FIELD_BYTES),
        ("rule", record.rule.as_deref(), MAX_RULE_BYTES),
        ("reason", Some(&*record.reason), MAX_RULE_BYTES),
    ];
    if let Some((name, _, _)) = fields
        .iter()
        .find(|(_, text, max)| text.is_some_and(|t| t.len() > *max))
    {
        return Some(name);
    }
    let challenge = record.challenge.as_ref().map_or(0, |c| {
        [&c.auth_contexts, &c.acr_values, &c.amr]
            .iter()
            .flat_map(|list| list.iter())
            .map(|v| v.len() + 1)
            .sum()
    });
    (challenge > MAX_CHALLENGE_BYTES).then_some("challenge")
}

/// The longest record line read. The server writes none longer: its request fields are cut at
/// 2 KiB each, and a token's claims and a request's attributes are bounded by its limits.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Reads past the rest of a line without keeping it.
fn skip_line(reader: &mut impl std::io::BufRead) -> std::io::Result<()> {
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            return Ok(());
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(end) => {
                reader.consume(end + 1);
                return Ok(());
            }
            None => {
                let all = chunk.len();
                reader.consume(all);
            }
        }
    }
}

impl<'p> Replayer<'p> {
    pub fn new(candidate: &'p Policy, baseline: Option<&'p Policy>) -> Self {
        Self {
            candidate,
            baseline,
            replay: Replay::default(),
            keep_bad: 20,
            rules: FastMap::default(),
            reasons: Reason::ALL
                .iter()
                .map(|r| (r.as_str(), r.as_str()))
                .collect(),
        }
    }

    /// Replays every line of one records file, read as it goes (memory stays flat whatever its
    /// size). A line that is not UTF-8, or longer than [`MAX_LINE_BYTES`] (skipped unread), is
    /// counted like any unreadable one.
    pub fn feed(&mut self, file: &str, reader: impl std::io::BufRead) -> std::io::Result<()> {
        use std::io::{BufRead as _, Read as _};
        let mut reader = reader;
        let mut buf = Vec::new();
        let mut number = 0;
        loop {
            buf.clear();
            let read = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)?;
            if read == 0 {
                return Ok(());
            }
            number += 1;
            if buf.len() > MAX_LINE_BYTES {
                if buf.last() != Some(&b'\n') {
                    skip_line(&mut reader)?;
                }
                self.bad(
                    file,
                    number,
                    format!("longer than {} KiB", MAX_LINE_BYTES / 1024),
                );
                continue;
            }
            match std::str::from_utf8(&buf) {
                Ok(line) => self.line(file, number, line),
                Err(_) => self.bad(file, number, "not UTF-8".into()),
            }
        }
    }

    fn line(&mut self, file: &str, number: usize, line: &str) {
        let i = number - 1;
        {
            if line.trim().is_empty() {
                return;
            }
            let record = match serde_json::from_str::<Record>(line) {
                Ok(record) => record,
                Err(e) => return self.bad(file, i + 1, e.to_string()),
            };
            let Some(at) = time_of(&record.time) else {
                return self.bad(file, i + 1, format!("unreadable time {:?}", record.time));
            };
            if let Some(field) = overlong_field(&record) {
                return self.bad(
                    file,
                    i + 1,
                    format!("{field} is longer than the server writes"),
                );
            }
            let facts = record.token.as_ref().map(principal_of);
            self.one(&record, facts.as_ref(), at);
        }
    }

    pub fn finish(self) -> Replay {
        self.replay
    }

    fn bad(&mut self, file: &str, line: usize, error: String) {
        self.replay.bad_line_count += 1;
        if self.replay.bad_lines.len() < self.keep_bad {
            self.replay.bad_lines.push(BadLine {
                file: file.to_owned(),
                line,
                error,
            });
        }
    }

    fn one(&mut self, record: &Record<'_>, facts: Option<&Facts>, at: i64) {
        let r = &mut self.replay;
        r.records += 1;
        // A sampled ALLOW counts for the ALLOWs it stands for, in every tally but the distinct
        // subjects.
        let w = record.weight.unwrap_or(1).clamp(1, MAX_WEIGHT);
        r.requests += w;
        r.first_time = Some(r.first_time.map_or(at, |t| t.min(at)));
        r.last_time = Some(r.last_time.map_or(at, |t| t.max(at)));
        let rule = record.rule.as_deref().unwrap_or_default();
        let rule = match self.rules.get(rule) {
            Some(shared) => Arc::clone(shared),
            None => {
                let shared: Arc<str> = Arc::from(rule);
                if self.rules.len() < MAX_RULES {
                    self.rules.insert(rule.to_owned(), Arc::clone(&shared));
                }
                shared
            }
        };
        let recorded = Answer {
            outcome: outcome_str(&record.outcome),
            reason: self
                .reasons
                .get(&*record.reason)
                .copied()
                .unwrap_or("unknown"),
            rule,
            asks: record.challenge.as_ref().map_or_else(
                || Arc::from(""),
                |c| asks(&c.auth_contexts, &c.acr_values, c.max_age, &c.amr),
            ),
        };
        let (baseline, candidate) = match facts {
            // Only the beginning of what it is decided on is known: it cannot be decided again.
            _ if record.truncated.iter().any(|field| {
                matches!(
                    &**field,
                    "method" | "host" | "path" | "operation" | "source"
                )
            }) =>
            {
                self.replay.as_recorded += 1;
                (recorded.clone(), recorded)
            }
            _ if matches!(
                &*record.reason,
                "blocked"
                    | "source_blocked"
                    | "session_revoked"
                    | "risk_store_unavailable"
                    | "overloaded"
                    | "deadline_exceeded"
                    | "internal_error"
                    | "too_many_headers"
                    | "headers_too_large"
                    | "request_too_large"
                    | "malformed_request"
            ) =>
            {
                // An operator's block or revocation, or an outage: not the policy's answer. Or
                // refused for what the record does not hold (the headers, their number and size,
                // an override header): decided again without it, it would pass.
                self.replay.as_recorded += 1;
                (recorded.clone(), recorded)
            }
            None if !matches!(&*record.reason, "token_missing" | "anonymous_allowed") => {
                // A refused token: its facts were never established; the answer stands.
                self.replay.as_recorded += 1;
                (recorded.clone(), recorded)
            }
            facts => {
                let mut request = request_of(record);
                // An issuer the policy lacks refuses the token, as the server would.
                let candidate =
                    decide(self.candidate, &mut request, facts, at).unwrap_or_else(|| {
                        self.replay.unknown_issuer += 1;
                        refused(Reason::IssuerUnknown)
                    });
                let baseline = match self.baseline {
                    Some(policy) => decide(policy, &mut request, facts, at)
                        .unwrap_or_else(|| refused(Reason::IssuerUnknown)),
                    None => recorded,
                };
                (baseline, candidate)
            }
        };
        let r = &mut self.replay;
        let subject = facts.map(|f| &*f.principal.subject);
        if let Some(s) = subject
            && !r.subjects.contains(s)
        {
            r.subjects.insert(s.to_owned());
        }
        let hour = at.div_euclid(3600);
        *r.requests_by_hour.entry(hour).or_default() += w;
        for (side, answer) in [&baseline, &candidate].into_iter().enumerate() {
            r.overall[side].add(answer.outcome, w);
            match r.per_rule.get_mut(&*answer.rule) {
                Some(tally) => tally[side].add(answer.outcome, w),
                None => {
                    let rule = if r.per_rule.len() < MAX_RULES {
                        answer.rule.to_string()
                    } else {
                        OTHER_RULES.to_owned()
                    };
                    r.per_rule.entry(rule).or_default()[side].add(answer.outcome, w);
                }
            }
            if answer.outcome == "STEP_UP" {
                r.step_ups[side] += w;
                r.step_ups_by_hour.entry(hour).or_default()[side] += w;
                if let Some(s) = subject
                    && !r.prompted[side].contains(s)
                {
                    r.prompted[side].insert(s.to_owned());
                }
            }
        }
        if baseline.outcome != candidate.outcome
            || baseline.reason != candidate.reason
            || baseline.asks != candidate.asks
        {
            *r.changes
                .entry((baseline.outcome, candidate.outcome))
                .or_default() += w;
            let what = record
                .operation
                .as_deref()
                .map(str::to_owned)
                .or_else(|| {
                    Some(format!(
                        "{} {}",
                        record.method.as_deref().unwrap_or("GET"),
                        record
                            .path
                            .as_deref()?
                            .split('?')
                            .next()
                            .map(ids_as_stars)
                            .unwrap_or_default()
                    ))
                })
                .unwrap_or_default();
            // Paths are the callers' to choose: past the bound, new ones are counted together, by
            // outcome and reason alone (a record's rule and challenge are the file's too).
            let key = (what, baseline.clone(), candidate.clone());
            let key = if r.changed_requests.len() >= MAX_CHANGED_REQUESTS
                && !r.changed_requests.contains_key(&key)
            {
                let plain = |a: Answer| Answer {
                    rule: Arc::from(""),
                    asks: Arc::from(""),
                    ..a
                };
                (OTHER_REQUESTS.to_owned(), plain(key.1), plain(key.2))
            } else {
                key
            };
            let entry = r.changed_requests.entry(key).or_default();
            entry.0 += w;
            if let Some(s) = subject {
                if !entry.1.contains(s) {
                    entry.1.insert(s.to_owned());
                }
                match r.changed_subjects.get_mut(s) {
                    Some(n) => *n += w,
                    None => {
                        r.changed_subjects.insert(s.to_owned(), w);
                    }
                }
            }
        }
    }
}

/// The request a record describes (its credential set per policy by [`decide`]).
fn request_of(record: &Record<'_>) -> AccessRequest {
    let http = record.path.as_deref().map(|path| {
        HttpAttributes::new(
            record.method.as_deref().unwrap_or("GET"),
            record.host.as_deref().unwrap_or_default(),
            path,
            Headers::default(),
        )
    });
    AccessRequest {
        credential: PresentedCredential::None,
        operation: record.operation.as_deref().map(str::to_owned),
        http,
        attributes: record.attributes.clone(),
        context: Map::new(),
        source: record
            .source
            .as_deref()
            .map(|address| Peer::new(address, String::new())),
        // A spelling the recorder never writes is no certificate.
        client_certificate: record
            .client_certificate
            .as_deref()
            .and_then(thumbprint::presented_from_text),
        proxy_header_count: None,
        explain: false,
        problem: None,
        // The counts the server read, which no policy change alters: a signal the record does
        // not name counted 0 (or was not there).
        risk_counts: Some(Box::new(
            record
                .risk
                .iter()
                .map(|(name, count)| (name.to_string(), *count))
                .collect(),
        )),
    }
}

/// What the record says verification established: the principal and the rest of the token, once
/// per record whatever the number of policies it is decided under.
struct Facts {
    principal: Arc<Principal>,
    capabilities: Arc<[Arc<str>]>,
    claims: Map<String, Value>,
    issuer: String,
    certificate_binding: Option<Thumbprint>,
}

fn principal_of(f: &TokenFacts<'_>) -> Facts {
    let words =
        |v: &[Cow<'_, str>]| -> Arc<[Arc<str>]> { v.iter().map(|s| Arc::from(&**s)).collect() };
    let xms_cc: Vec<Cow<'_, str>> = f
        .xms_cc
        .iter()
        .map(|c| Cow::Owned(c.to_ascii_lowercase()))
        .collect();
    let principal = Principal {
        issuer_id: Arc::from(&*f.issuer),
        issuer: Arc::from(""),
        subject: Arc::from(&*f.subject),
        tenant: f.tenant.as_deref().map(Arc::from),
        client_id: f.client_id.as_deref().map(Arc::from),
        acrs: words(&f.acrs),
        acr: f.acr.as_deref().map(Arc::from),
        amr: words(&f.amr),
        auth_time: f.auth_time,
        issued_at: None,
        token_id: None,
        claims_challenge_capable: xms_cc.iter().any(|c| c == "cp1"),
        scopes: words(&f.scopes),
        roles: words(&f.roles),
        app_only: f.app_only,
        expires_at: i64::MAX,
    };
    Facts {
        principal: Arc::new(principal),
        capabilities: words(&xms_cc),
        claims: f.claims.clone(),
        issuer: f.issuer.to_string(),
        // A spelling the recorder never writes binds the token to no certificate at all.
        certificate_binding: f
            .x5t_s256
            .as_deref()
            .map(|t| thumbprint::decode(t).unwrap_or_default()),
    }
}

/// A token refused before any rule, as verification would refuse it.
fn refused(reason: Reason) -> Answer {
    Answer {
        outcome: Outcome::Deny.as_str(),
        reason: reason.as_str(),
        rule: Arc::from(""),
        asks: Arc::from(""),
    }
}

/// The request decided under `policy`, with the record's token taken as verified by that
/// policy's issuer of the same id; `None` when the policy has no such issuer. A recorded tenant
/// the issuer no longer lists is refused as verification would refuse it.
fn decide(
    policy: &Policy,
    request: &mut AccessRequest,
    facts: Option<&Facts>,
    at: i64,
) -> Option<Answer> {
    request.credential = match facts {
        None => PresentedCredential::None,
        Some(f) => {
            let issuer = policy.issuers.by_id(&f.issuer)?;
            if let (Tenants::Only(allowed), Some(tenant)) = (&issuer.tenants, &f.principal.tenant)
                && !allowed.contains(&tenant.to_ascii_lowercase())
            {
                return Some(refused(Reason::TenantNotAllowed));
            }
            PresentedCredential::Verified(Established(Arc::new(VerifiedToken {
                issuer: Arc::clone(issuer),
                kid: None,
                key_binding: [0; 32],
                admin_only: false,
                principal: Arc::clone(&f.principal),
                client_capabilities: Arc::clone(&f.capabilities),
                claims: f.claims.clone(),
                fingerprint_digest: None,
                // A candidate whose issuer takes bound tokens as bearer tokens checks no binding,
                // as verification would not.
                certificate_binding: f
                    .certificate_binding
                    .filter(|_| !issuer.accept_bound_tokens)
                    .map(Box::new),
            })))
        }
    };
    let d = decision::decide(policy, request, at);
    Some(Answer {
        outcome: d.outcome.as_str(),
        reason: d.reason.as_str(),
        asks: d.step_up.as_deref().map_or_else(
            || Arc::from(""),
            |s| asks(&s.auth_contexts, &s.acr_values, s.max_age, &s.amr),
        ),
        rule: d.rule.unwrap_or_else(|| Arc::from("")),
    })
}

fn outcome_str(outcome: &str) -> &'static str {
    match outcome {
        "ALLOW" => Outcome::Allow.as_str(),
        "STEP_UP" => Outcome::StepUp.as_str(),
        _ => Outcome::Deny.as_str(),
    }
}

/// RFC 3339 → unix seconds.
fn time_of(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp())
}

/// A path with its id-like segments (digits, or long hex or UUIDs) as `*`, so that the requests of
/// one route count together.
fn ids_as_stars(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            let id = !segment.is_empty()
                && (segment.bytes().all(|b| b.is_ascii_digit())
                    || (segment.len() >= 16
                        && segment.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')));
            if id { "*" } else { segment }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A subject as reports show it: a short SHA-256 (a keyed hash from the records stays as it is).
pub fn shown_subject(subject: &str) -> String {
    if subject.starts_with("hmac-sha256:") {
        return subject.to_owned();
    }
    let hex = crate::identity::fingerprint(subject);
    format!("sha256:{hex}")
}

/// Whether a reason code names a refused token (for the report's note).
pub fn is_token_refusal(reason: &str) -> bool {
    Reason::ALL
        .iter()
        .find(|r| r.as_str() == reason)
        .is_some_and(|r| r.is_invalid_token())
}

#[cfg(test)]
mod tests {
    //! A record replayed against the policy that made it gets the same answer, risk counts and
    //! all; against another threshold, the answer those counts give there.
    use std::time::{Duration, UNIX_EPOCH};

    use jsonwebtoken::Algorithm;

    use super::*;
    use crate::{
        demo::{self, DEMO_RSA_KID, TokenSpec},
        policy::testing::{DEMO_POLICY, compile_policy, demo_file},
        request::Door,
        telemetry::records::format_record,
    };

    const NOW: i64 = 1_800_000_000;

    /// The demo policy with its `repeated_step_ups` signal enforcing at `threshold`, as
    /// docs/risk.md shows it.
    fn enforcing(threshold: u32) -> String {
        let text = DEMO_POLICY
            .replace(
                "action: log                        # then: action: step_up, require: { auth_contexts: [c3] }",
                "action: step_up\n      require: { auth_contexts: [c3] }",
            )
            .replace("      threshold: 10\n", &format!("      threshold: {threshold}\n"));
        assert!(
            text.contains("action: step_up\n"),
            "the demo policy's signal was edited"
        );
        text
    }

    /// Alice's Entra token with context c1, signed a minute ago.
    fn alice_token() -> String {
        let spec = TokenSpec {
            acrs: vec!["c1".into()],
            xms_cc: vec!["cp1".into()],
            auth_age: Some(60),
            ..TokenSpec::default()
        };
        demo::sign(
            &spec.claims(NOW),
            &demo_file("demo-rsa-private.pem"),
            Algorithm::RS256,
            DEMO_RSA_KID,
        )
        .unwrap()
    }

    /// The record of alice's `GET /api/orders/1` after she was prompted `prompted` times.
    fn record_after(prompted: i64, text: &str) -> String {
        let live = compile_policy(text);
        let signal = live.risk.signal("repeated_step_ups").unwrap();
        for i in 0..prompted {
            signal
                .table()
                .record("alice", None, NOW * 1000 - 60_000 + i);
        }
        let request = AccessRequest {
            credential: PresentedCredential::Authorization(format!("Bearer {}", alice_token())),
            http: Some(HttpAttributes::new(
                "GET",
                "api.example",
                "/api/orders/1",
                Headers::default(),
            )),
            ..AccessRequest::default()
        };
        let mut decision = decision::decide(&live, &request, NOW);
        // As the server does for a decision it records.
        live.risk
            .read_for_record(&request, &mut decision, NOW * 1000);
        format_record(
            &live.records,
            Door::Check,
            &request,
            &decision,
            UNIX_EPOCH + Duration::from_secs(NOW as u64),
            1,
        )
    }

    fn replayed(line: &str, candidate: &str, baseline: Option<&str>) -> Replay {
        let candidate = compile_policy(candidate);
        let baseline = baseline.map(compile_policy);
        let mut replayer = Replayer::new(&candidate, baseline.as_ref());
        replayer.feed("records.jsonl", line.as_bytes()).unwrap();
        replayer.finish()
    }

    /// A line past the bound is counted as unreadable without being held, and the lines after
    /// it are read as usual.
    #[test]
    fn an_overlong_line_is_skipped_unread_and_the_next_one_replayed() {
        let good = record_after(0, DEMO_POLICY);
        let long = format!("{{\"x\":\"{}\"}}\n", "a".repeat(MAX_LINE_BYTES + 10));
        for input in [
            format!("{long}{good}"),
            format!("{good}{}", &long[..long.len() - 1]),
        ] {
            let candidate = compile_policy(DEMO_POLICY);
            let mut replayer = Replayer::new(&candidate, None);
            // A reader whose buffer is smaller than the line: the skip reads it in pieces.
            let reader = std::io::BufReader::with_capacity(4096, input.as_bytes());
            replayer.feed("records.jsonl", reader).unwrap();
            let replay = replayer.finish();
            assert_eq!(replay.records, 1, "the good line is replayed");
            assert_eq!(replay.bad_line_count, 1);
            assert!(
                replay.bad_lines[0].error.contains("longer than 1024 KiB"),
                "{:?}",
                replay.bad_lines[0].error
            );
        }
    }

    /// Changed requests are told apart up to a bound (their paths are the callers'), the rest
    /// counted together.
    #[test]
    fn changed_requests_past_the_bound_are_counted_together() {
        let line = record_after(0, DEMO_POLICY);
        assert!(line.contains("\"path\":\"/api/orders/1\""), "{line}");
        let candidate = compile_policy(&DEMO_POLICY.replace(
            "      - { operation: \"*\" }\n    require: { authenticated: true }\n",
            "      - { operation: \"*\" }\n    require: { roles: [Nobody] }\n",
        ));
        let mut replayer = Replayer::new(&candidate, None);
        let lines: String = (0..MAX_CHANGED_REQUESTS + 5)
            .map(|i| {
                // Letters only: digits would read as an id and be starred.
                let name: String = format!("{i:05}")
                    .bytes()
                    .map(|d| char::from(b'a' + (d - b'0')))
                    .collect();
                line.replace("/api/orders/1", &format!("/api/{name}"))
            })
            .collect();
        replayer.feed("records.jsonl", lines.as_bytes()).unwrap();
        let replay = replayer.finish();
        assert_eq!(replay.records as usize, MAX_CHANGED_REQUESTS + 5);
        assert_eq!(
            replay.changes.values().sum::<u64>() as usize,
            MAX_CHANGED_REQUESTS + 5,
            "{:?}",
            replay.changes
        );
        assert_eq!(replay.changed_requests.len(), MAX_CHANGED_REQUESTS + 1);
        let other = replay
            .changed_requests
            .iter()
            .find(|((what, _, _), _)| what == OTHER_REQUESTS)
            .map(|(_, (n, _))| *n);
        assert_eq!(other, Some(5));
    }

    /// A candidate without the record's issuer, or whose issuer no longer lists the record's
    /// tenant, refuses the token as verification would: a change, not "as recorded".
    #[test]
    fn an_issuer_or_tenant_the_candidate_drops_refuses_the_token() {
        let line = record_after(0, DEMO_POLICY);
        assert!(line.contains("\"outcome\":\"ALLOW\""), "{line}");
        let without = DEMO_POLICY.replace("id: demo-entra", "id: another-entra");
        let replay = replayed(&line, &without, None);
        assert_eq!(replay.unknown_issuer, 1);
        assert_eq!(
            replay.changes.get(&("ALLOW", "DENY")),
            Some(&1),
            "{replay:?}"
        );
        assert_eq!(replay.overall[1].deny, 1);
        // The same for a baseline lacking it, against a candidate that has it.
        let replay = replayed(&line, DEMO_POLICY, Some(&without));
        assert_eq!(
            replay.changes.get(&("DENY", "ALLOW")),
            Some(&1),
            "{replay:?}"
        );

        let tenant = line
            .split("\"tenant\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("the record holds the token's tenant")
            .to_owned();
        let listing = |tenants: &str| {
            DEMO_POLICY.replace(
                "    issuer: https://login.demo.stepgate.invalid/entra/v2.0\n",
                &format!(
                    "    issuer: https://login.demo.stepgate.invalid/{{tenantid}}/v2.0\n    tenants: [{tenants}]\n"
                ),
            )
        };
        let replay = replayed(&line, &listing(&tenant), None);
        assert!(replay.changes.is_empty(), "{replay:?}");
        let other = "00000000-0000-0000-0000-000000000001";
        let replay = replayed(&line, &listing(other), None);
        assert_eq!(
            replay.changes.get(&("ALLOW", "DENY")),
            Some(&1),
            "{replay:?}"
        );
        assert_eq!(replay.unknown_issuer, 0);
    }

    /// A candidate that asks a step-up for something else (another context, another `max_age`)
    /// answers differently even with the same outcome and reason.
    #[test]
    fn a_step_up_asking_for_something_else_is_a_change() {
        let live = compile_policy(DEMO_POLICY);
        let spec = TokenSpec {
            xms_cc: vec!["cp1".into()],
            ..TokenSpec::default()
        };
        let token = demo::sign(
            &spec.claims(NOW),
            &demo_file("demo-rsa-private.pem"),
            Algorithm::RS256,
            DEMO_RSA_KID,
        )
        .unwrap();
        let request = AccessRequest {
            credential: PresentedCredential::Authorization(format!("Bearer {token}")),
            operation: Some("payments.wire_transfer".into()),
            ..AccessRequest::default()
        };
        let decision = decision::decide(&live, &request, NOW);
        assert_eq!(decision.outcome, Outcome::StepUp, "{decision:?}");
        let line = format_record(
            &live.records,
            Door::Decide,
            &request,
            &decision,
            UNIX_EPOCH + Duration::from_secs(NOW as u64),
            1,
        );
        assert!(line.contains("\"auth_contexts\":[\"c1\"]"), "{line}");
        let replay = replayed(&line, DEMO_POLICY, None);
        assert!(replay.changes.is_empty(), "the same policy: {replay:?}");
        let require = "    require: { auth_contexts: [c1], max_age: 15m }\n";
        for candidate in [
            DEMO_POLICY.replace(
                require,
                "    require: { auth_contexts: [c3], max_age: 15m }\n",
            ),
            DEMO_POLICY.replace(
                require,
                "    require: { auth_contexts: [c1], max_age: 5m }\n",
            ),
        ] {
            let replay = replayed(&line, &candidate, None);
            assert_eq!(
                replay.changes.get(&("STEP_UP", "STEP_UP")),
                Some(&1),
                "{replay:?}"
            );
            let ((_, from, to), _) = replay.changed_requests.iter().next().unwrap();
            assert_eq!(&*from.asks, "auth_contexts c1; max_age 900");
            assert_ne!(from.asks, to.asks);
            let text = report::text(&replay, "recorded");
            assert!(
                text.contains("asking auth_contexts c1; max_age 900 →"),
                "{text}"
            );
        }
    }

    /// A record keeps a bound token's `x5t#S256` and the thumbprint of the certificate the
    /// request came with, and replay decides on them as the server did: the same policy changes
    /// nothing, and one that takes only bound tokens refuses the bearer token alone.
    #[test]
    fn a_certificate_bound_token_replays_on_its_recorded_binding() {
        let live = compile_policy(DEMO_POLICY);
        use crate::identity::ClientCertificate;
        let certificate = b"a client certificate's DER".to_vec();
        let thumbprint: Thumbprint = {
            use sha2::Digest as _;
            sha2::Sha256::digest(&certificate).into()
        };
        let spec = |bound: bool| TokenSpec {
            extra: if bound {
                [(
                    "cnf".to_owned(),
                    serde_json::json!({ "x5t#S256": thumbprint::encode(&thumbprint) }),
                )]
                .into_iter()
                .collect()
            } else {
                Default::default()
            },
            ..TokenSpec::default()
        };
        let record = |bound: bool, presented: Option<ClientCertificate>| {
            let token = demo::sign(
                &spec(bound).claims(NOW),
                &demo_file("demo-rsa-private.pem"),
                Algorithm::RS256,
                DEMO_RSA_KID,
            )
            .unwrap();
            let request = AccessRequest {
                credential: PresentedCredential::Authorization(format!("Bearer {token}")),
                http: Some(HttpAttributes::new(
                    "GET",
                    "api.example",
                    "/api/orders/1",
                    Headers::default(),
                )),
                client_certificate: presented,
                ..AccessRequest::default()
            };
            let decision = decision::decide(&live, &request, NOW);
            let line = format_record(
                &live.records,
                Door::Check,
                &request,
                &decision,
                UNIX_EPOCH + Duration::from_secs(NOW as u64),
                1,
            );
            (decision.reason, line)
        };
        let der = |bytes: &[u8]| Some(ClientCertificate::Der(bytes.to_vec()));
        let (reason, bound) = record(true, der(&certificate));
        assert_eq!(reason, Reason::Allowed);
        let spelled = thumbprint::encode(&thumbprint);
        assert!(
            bound.contains(&format!("\"client_certificate\":\"{spelled}\""))
                && bound.contains(&format!("\"x5t#S256\":\"{spelled}\"")),
            "{bound}"
        );
        let (reason, missing) = record(true, None);
        assert_eq!(reason, Reason::ClientCertificateMissing);
        let (reason, other) = record(true, der(b"another certificate"));
        assert_eq!(reason, Reason::ClientCertificateMismatch);
        let (reason, unreadable) = record(
            true,
            Some(ClientCertificate::UrlEncodedPem("not%20PEM".into())),
        );
        assert_eq!(reason, Reason::ClientCertificateInvalid);
        assert!(
            unreadable.contains("\"client_certificate\":\"not_one_pem\""),
            "{unreadable}"
        );
        let (reason, bearer) = record(false, der(&certificate));
        assert_eq!(reason, Reason::Allowed);
        assert!(!bearer.contains("client_certificate"), "{bearer}");
        let lines = [bound, missing, other, unreadable, bearer].join("\n");
        let replay = replayed(&lines, DEMO_POLICY, None);
        assert!(replay.changes.is_empty(), "the same policy: {replay:?}");
        // An issuer that takes bound tokens as bearer tokens: the three refused ALLOW.
        let accepting = DEMO_POLICY.replacen(
            "    challenge: entra\n",
            "    challenge: entra\n    accept_bound_tokens: true\n",
            1,
        );
        let replay = replayed(&lines, &accepting, None);
        assert_eq!(
            replay.changes.get(&("DENY", "ALLOW")),
            Some(&3),
            "{replay:?}"
        );
        let only_bound = DEMO_POLICY.replace(
            "    require: { authenticated: true }\n",
            "    require: { certificate_bound: true }\n",
        );
        assert_ne!(only_bound, DEMO_POLICY);
        let replay = replayed(&lines, &only_bound, None);
        assert_eq!(
            replay.changes.get(&("ALLOW", "DENY")),
            Some(&1),
            "the bearer token alone: {replay:?}"
        );
        let ((_, from, to), _) = replay.changed_requests.iter().next().unwrap();
        assert_eq!((from.reason, to.reason), ("allowed", "token_not_bound"));
    }

    /// A sampled ALLOW counts for the ALLOWs it stands for, in the tallies and the changes.
    #[test]
    fn a_sampled_allow_counts_for_its_weight() {
        let line = record_after(0, DEMO_POLICY);
        assert!(!line.contains("\"weight\""), "{line}");
        let weighted = line.replace("\"status\":200,", "\"status\":200,\"weight\":10,");
        assert_ne!(weighted, line);
        let candidate = DEMO_POLICY.replace(
            "      - { operation: \"*\" }\n    require: { authenticated: true }\n",
            "      - { operation: \"*\" }\n    require: { roles: [Nobody] }\n",
        );
        let replay = replayed(&format!("{weighted}{line}"), &candidate, None);
        assert_eq!((replay.records, replay.requests), (2, 11));
        assert_eq!(replay.overall[0].allow, 11);
        assert_eq!(replay.overall[1].deny, 11);
        assert_eq!(replay.changes.get(&("ALLOW", "DENY")), Some(&11));
        assert_eq!(
            replay.subjects.len(),
            1,
            "distinct subjects are not weighed"
        );
        let text = report::text(&replay, "recorded");
        assert!(text.contains("stand for 11 requests"), "{text}");
        // A hostile weight is bounded.
        let huge = line.replace(
            "\"status\":200,",
            "\"status\":200,\"weight\":18446744073709551615,",
        );
        let replay = replayed(&format!("{huge}{huge}"), &candidate, None);
        assert_eq!(replay.requests, 2 * MAX_WEIGHT);
    }

    /// A request refused for what its record does not hold (its headers) keeps its answer:
    /// decided again without them it would pass, a relaxation no policy made.
    #[test]
    fn a_refusal_for_unrecorded_headers_is_kept_as_recorded() {
        let line = record_after(0, DEMO_POLICY);
        let allowed = "\"outcome\":\"ALLOW\",\"reason\":\"allowed\",\"status\":200";
        assert!(line.contains(allowed), "{line}");
        for reason in [
            "too_many_headers",
            "headers_too_large",
            "request_too_large",
            "malformed_request",
        ] {
            let refused = line.replace(
                allowed,
                &format!("\"outcome\":\"DENY\",\"reason\":\"{reason}\",\"status\":431"),
            );
            let replay = replayed(&refused, DEMO_POLICY, Some(DEMO_POLICY));
            assert_eq!(replay.as_recorded, 1, "{reason}");
            assert!(replay.changes.is_empty(), "{reason}: {:?}", replay.changes);
            assert_eq!(replay.overall[1].deny, 1, "{reason}");
        }
    }

    /// What a record names itself (its rule, its fields) cannot grow the tallies past their
    /// bounds: a field longer than the server writes makes a bad line, and distinct rules past
    /// the bound are counted together, as are changed requests whatever their rule.
    #[test]
    fn a_records_own_names_are_bounded_too() {
        let line = record_after(0, DEMO_POLICY);
        let long_path = line.replace(
            "/api/orders/1",
            &format!("/api/{}", "a".repeat(MAX_FIELD_BYTES)),
        );
        let replay = replayed(&long_path, DEMO_POLICY, None);
        assert_eq!((replay.records, replay.bad_line_count), (0, 1));
        assert!(
            replay.bad_lines[0].error.contains("path is longer"),
            "{:?}",
            replay.bad_lines
        );
        // A long subject is a token's own, written whole by the server: replayed.
        assert!(line.contains("\"subject\":\"alice\""), "{line}");
        let long_subject = line.replace(
            "\"subject\":\"alice\"",
            &format!("\"subject\":\"{}\"", "s".repeat(3 * MAX_FIELD_BYTES)),
        );
        let replay = replayed(&long_subject, DEMO_POLICY, None);
        assert_eq!((replay.records, replay.bad_line_count), (1, 0));

        let candidate = compile_policy(&DEMO_POLICY.replace(
            "      - { operation: \"*\" }\n    require: { authenticated: true }\n",
            "      - { operation: \"*\" }\n    require: { roles: [Nobody] }\n",
        ));
        let mut replayer = Replayer::new(&candidate, None);
        let rule = "\"rule\":\"everything-else\"";
        assert!(line.contains(rule), "{line}");
        let n = MAX_RULES.max(MAX_CHANGED_REQUESTS) + 5;
        let lines: String = (0..n)
            .map(|i| line.replace(rule, &format!("\"rule\":\"r{i}\"")))
            .collect();
        replayer.feed("records.jsonl", lines.as_bytes()).unwrap();
        let replay = replayer.finish();
        assert_eq!(replay.records as usize, n);
        assert!(
            replay.per_rule.len() <= MAX_RULES + 2,
            "{}",
            replay.per_rule.len()
        );
        assert!(replay.per_rule.contains_key(OTHER_RULES));
        assert!(
            replay.changed_requests.len() <= MAX_CHANGED_REQUESTS + 1,
            "{}",
            replay.changed_requests.len()
        );
    }

    #[test]
    fn a_risk_step_up_replays_as_the_same_answer_under_the_same_policy() {
        let text = enforcing(10);
        let line = record_after(10, &text);
        assert!(line.contains("\"outcome\":\"STEP_UP\""), "{line}");
        assert!(
            line.contains("\"risk\":{\"repeated_step_ups\":10}"),
            "{line}"
        );
        for baseline in [None, Some(text.as_str())] {
            let replay = replayed(&line, &text, baseline);
            assert_eq!(replay.records, 1);
            assert_eq!(replay.as_recorded, 0, "decided again, not kept");
            assert!(
                replay.changes.is_empty(),
                "record {line}\nthe same policy answers it differently: {:?}",
                replay.changes
            );
            assert_eq!(replay.step_ups, [1, 1]);
        }
        // A higher threshold relaxes it: the recorded count is under it.
        let replay = replayed(&line, &enforcing(20), Some(&text));
        assert_eq!(
            replay.changes.get(&("STEP_UP", "ALLOW")),
            Some(&1),
            "{:?}",
            replay.changes
        );
        // Below the threshold nothing is recorded, and a lower one tightens it.
        let quiet = record_after(5, &text);
        assert!(
            quiet.contains("\"risk\":{\"repeated_step_ups\":5}"),
            "{quiet}"
        );
        assert!(quiet.contains("\"outcome\":\"ALLOW\""), "{quiet}");
        let replay = replayed(&quiet, &enforcing(5), Some(&text));
        assert_eq!(replay.changes.get(&("ALLOW", "STEP_UP")), Some(&1));
        let none = record_after(0, &text);
        assert!(!none.contains("\"risk\""), "{none}");
    }

    /// The change the demo policy suggests — a signal that only logs made `step_up` — is
    /// previewed: a record holds every signal's count for its keys, read or not.
    #[test]
    fn a_log_signal_made_step_up_replays_on_the_users_count() {
        let line = record_after(10, DEMO_POLICY);
        assert!(line.contains("\"outcome\":\"ALLOW\""), "{line}");
        assert!(line.contains("\"repeated_step_ups\":10"), "{line}");
        let replay = replayed(&line, &enforcing(10), Some(DEMO_POLICY));
        assert_eq!(
            replay.changes.get(&("ALLOW", "STEP_UP")),
            Some(&1),
            "{:?}\n{line}",
            replay.changes
        );
    }

    /// A signal keyed by the token's fingerprint: replay has no token to fingerprint, and reads
    /// the recorded count all the same.
    #[test]
    fn a_token_keyed_risk_step_up_replays_as_recorded() {
        let text = enforcing(10).replace(
            "      key: subject\n      window: 10m\n",
            "      key: token\n      window: 10m\n",
        );
        assert!(
            text.contains("key: token"),
            "the demo policy's signal was edited"
        );
        let live = compile_policy(&text);
        let request = AccessRequest {
            credential: PresentedCredential::Authorization(format!("Bearer {}", alice_token())),
            operation: Some("orders.read".into()),
            ..AccessRequest::default()
        };
        let fingerprint = decision::decide(&live, &request, NOW)
            .token_fingerprint
            .expect("a fingerprint");
        let signal = live.risk.signal("repeated_step_ups").unwrap();
        for i in 0..10 {
            signal
                .table()
                .record(&fingerprint, None, NOW * 1000 - 60_000 + i);
        }
        let decision = decision::decide(&live, &request, NOW);
        assert_eq!(decision.outcome, Outcome::StepUp, "{decision:#?}");
        let line = format_record(
            &live.records,
            Door::Check,
            &request,
            &decision,
            UNIX_EPOCH + Duration::from_secs(NOW as u64),
            1,
        );
        let replay = replayed(&line, &text, None);
        assert!(replay.changes.is_empty(), "{:?}\n{line}", replay.changes);
        assert_eq!(replay.step_ups, [1, 1]);
    }
}
