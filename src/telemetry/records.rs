//! Decision records: one JSON line per decision, holding what is needed to decide the request
//! again without its token (`stepgate replay` reads them), written apart from the application log.
//!
//! - **What a record holds.** The time, request id and door; the request (method, host and path,
//!   or operation, with the attributes the policy's allow-list names, and the source address);
//!   what verification established (issuer, tenant, subject — optionally a keyed hash —, client,
//!   `acrs`, `acr`, `amr`, `auth_time`, scopes, roles, client capabilities, and the claims the
//!   policy reads); the decision (rule, outcome, reason, status, shadow outcomes, the challenge
//!   asked). Never a token, a signature or a claim the policy does not read.
//! - **Sampling.** Every STEP_UP and DENY is kept; ALLOWs are kept at `allow_sample`.
//! - **What anyone can make.** A decision without a verified token (no token, a refused one, a
//!   malformed request, a blocked source) is what a caller with no credential can cause as fast
//!   as stepgate decides; at most `unverified_per_second` of those are recorded each second, so
//!   that a flood of them cannot rotate every other record out of the kept files. The rest are
//!   counted (`stepgate_records_total{result="rate_limited"}`), as every decision is in
//!   `stepgate_decisions_total`.
//! - **The request path never waits.** It formats the line and hands it to a bounded queue; a
//!   writer thread appends to the file (or stdout) and rotates it by size. A full queue drops the
//!   record and counts it (`stepgate_records_dropped_total`).

use std::{
    cell::RefCell,
    fmt::Write as _,
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{Map, Value};

use super::{line, metrics};
use crate::{
    decision::{Decision, Outcome},
    identity::{VerifiedToken, thumbprint},
    request::{AccessRequest, Door},
};

/// Bytes of records waiting for the writer; past it, records are dropped and counted.
const CAPACITY: usize = 4 * 1024 * 1024;
/// Pending bytes that wake the writer early (a wake-up per record would cost a context switch
/// each: most of a record's price).
const WAKE_AT: usize = 256 * 1024;
/// Longest a record waits in memory.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How long the end of the process waits for the last records to be written.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// The compiled `records:` section.
#[derive(Clone, PartialEq)]
pub struct RecordsPolicy {
    pub enabled: bool,
    /// `None`: stdout.
    pub path: Option<PathBuf>,
    pub max_bytes: u64,
    pub keep: u32,
    /// Share of ALLOWs recorded, in millionths.
    pub allow_sample_ppm: u32,
    /// Records of decisions without a verified token kept per second at most; `0`: all.
    pub unverified_per_second: u32,
    /// Decide attributes recorded.
    pub attributes: Vec<String>,
    /// When set, subjects are recorded as HMAC-SHA256 under this key (hex, 32 digits).
    pub subject_key: Option<SubjectKey>,
}

impl std::fmt::Debug for RecordsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordsPolicy")
            .field("enabled", &self.enabled)
            .field("path", &self.path)
            .field("allow_sample_ppm", &self.allow_sample_ppm)
            .field("unverified_per_second", &self.unverified_per_second)
            .field("attributes", &self.attributes)
            .field(
                "subject_key",
                &self.subject_key.as_ref().map(|_| "(secret)"),
            )
            .finish_non_exhaustive()
    }
}

impl Default for RecordsPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            path: None,
            max_bytes: 100 * 1024 * 1024,
            keep: 5,
            allow_sample_ppm: 1_000_000,
            unverified_per_second: 100,
            attributes: Vec::new(),
            subject_key: None,
        }
    }
}

/// Where records go: a buffer the request path appends to, and the writer thread that empties it.
#[derive(Debug)]
pub struct RecordSink {
    shared: Arc<Shared>,
    /// Decisions seen, for sampling ALLOWs evenly.
    seen: AtomicU64,
    /// Records without a verified token kept in the current second: the unix second in the high
    /// 32 bits, the count in the low.
    unverified: AtomicU64,
    /// The records of refusals made before a request was read, this second: (second << 32) |
    /// count, as `unverified`.
    refusals: AtomicU64,
    target: String,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Signalled when the writer has written everything after `finishing` was set.
    done: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Records in `bytes`.
    records: u64,
    woken: bool,
    /// The writer sleeps until a record arrives (nothing was pending when it last looked).
    idle: bool,
    /// The process is ending: write what is pending now, then stop.
    finishing: bool,
    /// The writer stopped (everything before `finishing` written, or given up on).
    finished: bool,
}

impl RecordSink {
    /// Opens `path` (appending; `None`: stdout) and starts the writer thread.
    pub fn open(path: Option<&Path>, max_bytes: u64, keep: u32) -> io::Result<Arc<Self>> {
        let out = Output::open(path, max_bytes, keep)?;
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let target = path.map_or_else(|| "stdout".to_owned(), |p| p.display().to_string());
        thread::Builder::new()
            .name("stepgate-records".into())
            .spawn(move || write_loop(&worker, out))?;
        Ok(Arc::new(Self {
            shared,
            seen: AtomicU64::new(0),
            unverified: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            target,
        }))
    }

    /// Where the records go, for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Records a refusal made before a request was read (a message that does not decode or is
    /// too large, an overload, a caller not allowed, a panic): no request, at most
    /// [`REFUSALS_PER_SECOND`] a second, apart from the decisions made without a verified token,
    /// so that a flood of broken calls cannot crowd their records out.
    pub fn record_refusal(&self, policy: &RecordsPolicy, door: Door, decision: &Decision) {
        let now = SystemTime::now();
        if !admit(&self.refusals, REFUSALS_PER_SECOND, unix_second(now)) {
            metrics::global().record_record(RecordEvent::RateLimited);
            return;
        }
        self.write(policy, door, &AccessRequest::default(), decision, now, 1);
    }

    /// Records one decision under `policy`'s settings (sampling, allow-list, subject hashing).
    pub fn record(
        &self,
        policy: &RecordsPolicy,
        door: Door,
        request: &AccessRequest,
        decision: &Decision,
    ) {
        let mut weight = 1;
        if decision.outcome == Outcome::Allow && policy.allow_sample_ppm < 1_000_000 {
            // Evenly spread: the n-th ALLOW is kept when n × rate crosses a whole million.
            let n = self.seen.fetch_add(1, Relaxed);
            let rate = u64::from(policy.allow_sample_ppm);
            if (n + 1) * rate / 1_000_000 == n * rate / 1_000_000 {
                metrics::global().record_record(RecordEvent::SampledOut);
                return;
            }
            weight = sample_weight(n, rate);
        }
        let now = SystemTime::now();
        if decision.verified.is_none()
            && policy.unverified_per_second > 0
            && !self.admit_unverified(policy.unverified_per_second, unix_second(now))
        {
            metrics::global().record_record(RecordEvent::RateLimited);
            return;
        }
        self.write(policy, door, request, decision, now, weight);
    }

    /// Formats an admitted record and queues it for the writer.
    fn write(
        &self,
        policy: &RecordsPolicy,
        door: Door,
        request: &AccessRequest,
        decision: &Decision,
        now: SystemTime,
        weight: u64,
    ) {
        thread_local! {
            /// The line being formatted, kept between records: formatted outside the lock and
            /// copied in under it.
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|line| {
            line.clear();
            write_record(policy, door, request, decision, now, weight, line);
            self.enqueue(line.as_bytes());
            if line.capacity() > 64 * 1024 {
                // A record with very large claims: do not keep its buffer.
                *line = String::new();
            }
        });
    }

    /// Whether one more record without a verified token fits `per_second` in `second`.
    fn admit_unverified(&self, per_second: u32, second: u32) -> bool {
        admit(&self.unverified, per_second, second)
    }

    /// Writes every record made so far and stops the writer, waiting at most [`FINISH_WAIT`] (a
    /// slow disk must not hold up the end of the process for long). For the end of `serve`,
    /// once no call is left to decide: records made after it are not written.
    pub fn finish(&self) {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending.finishing = true;
        self.shared.wake.notify_one();
        let (pending, _) = self
            .shared
            .done
            .wait_timeout_while(pending, FINISH_WAIT, |p| !p.finished)
            .unwrap_or_else(PoisonError::into_inner);
        if !pending.finished {
            tracing::warn!(
                records = pending.records,
                "the decision records file did not take the last records in time"
            );
        }
    }

    fn enqueue(&self, line: &[u8]) {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pending.bytes.len() + line.len() > CAPACITY {
            drop(pending);
            metrics::global().record_record(RecordEvent::Dropped);
            static FULL: super::throttle::Throttle =
                super::throttle::Throttle::new(super::throttle::WARNING_PERIOD);
            if let Some(unlogged) = FULL.admit() {
                tracing::error!(
                    records = %self.target,
                    unlogged,
                    "the decision records queue is full (its file or stdout does not take them \
                     as fast as they come): records are dropped and counted in \
                     stepgate_records_total{{result=\"dropped\"}} (later drops within 10 s are \
                     only counted)"
                );
            }
            return;
        }
        pending.bytes.extend_from_slice(line);
        pending.records += 1;
        let wake = (pending.idle || pending.bytes.len() >= WAKE_AT) && !pending.woken;
        pending.woken |= wake;
        pending.idle = false;
        drop(pending);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

/// The unix second of `time` (32 bits hold seconds until 2106).
fn unix_second(time: SystemTime) -> u32 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// What became of a decision's record (for `stepgate_records_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordEvent {
    Written,
    /// The queue was full or the writer gone.
    Dropped,
    /// An ALLOW not kept by `allow_sample`.
    SampledOut,
    /// A decision without a verified token past `unverified_per_second`.
    RateLimited,
}

impl RecordEvent {
    pub const ALL: [RecordEvent; 4] = [
        Self::Written,
        Self::Dropped,
        Self::SampledOut,
        Self::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Dropped => "dropped",
            Self::SampledOut => "sampled_out",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// The longest request text a record holds per field, in bytes: a request's id, method, host,
/// path, operation and source are cut there (at a character boundary) and named in `truncated`. A path
/// holds up to the policy's header limit, and a record of every anonymous request that long
/// would crowd the others out of the queue and the rotated files.
pub const MAX_RECORDED_TEXT: usize = 2048;

/// The fields a record cut at [`MAX_RECORDED_TEXT`].
#[derive(Default)]
struct Cut {
    fields: Vec<&'static str>,
}

impl Cut {
    /// `value`, cut to [`MAX_RECORDED_TEXT`] bytes; `field` is noted when it was.
    fn cap<'v>(&mut self, field: &'static str, value: Option<&'v str>) -> Option<&'v str> {
        let value = value?;
        if value.len() <= MAX_RECORDED_TEXT {
            return Some(value);
        }
        self.fields.push(field);
        let end = (0..=MAX_RECORDED_TEXT)
            .rev()
            .find(|&i| value.is_char_boundary(i))
            .unwrap_or(0);
        Some(&value[..end])
    }
}

/// Records of refusals made before a request was read, kept each second.
pub const REFUSALS_PER_SECOND: u32 = 10;

/// Whether one more record fits `per_second` in `second`, counted in `counter` as
/// (second << 32) | count.
fn admit(counter: &AtomicU64, per_second: u32, second: u32) -> bool {
    let mut seen = counter.load(Relaxed);
    loop {
        let (at, kept) = ((seen >> 32) as u32, seen as u32);
        // A new second starts a new count; so does a clock set back (a reading a second
        // behind another thread's restarts it too, which costs at most a few records more).
        let next = if at != second {
            (u64::from(second) << 32) | 1
        } else if kept < per_second {
            seen + 1
        } else {
            return false;
        };
        match counter.compare_exchange_weak(seen, next, Relaxed, Relaxed) {
            Ok(_) => return true,
            Err(now) => seen = now,
        }
    }
}

/// `target` with the value of every RFC 6750 `access_token` query parameter (its name written
/// plainly or percent-encoded), and of every other credential's (`code`, `refresh_token`,
/// `client_secret`, `api_key`, `sig`, …: `request::is_credential_name`), replaced by `REDACTED`:
/// a record never holds a raw token, and replay only needs to know that one was there.
pub fn without_query_tokens(target: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let Some((path, query)) = target.split_once('?') else {
        return Cow::Borrowed(target);
    };
    let is_token = |pair: &str| {
        let name = crate::request::parameter_name(pair);
        crate::request::is_credential_name(name)
    };
    // Pairs split at `;` as well as `&`: some servers read `;` as a separator.
    let pairs = || query.split(['&', ';']);
    if !pairs().any(is_token) {
        return Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(target.len());
    out.push_str(path);
    out.push('?');
    let mut rest = query;
    for pair in pairs() {
        match pair.split_once('=') {
            Some((name, _)) if is_token(pair) => {
                out.push_str(name);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
        // The separator that ended the pair, as written.
        rest = &rest[pair.len()..];
        if let Some(separator) = rest.chars().next() {
            out.push(separator);
            rest = &rest[1..];
        }
    }
    Cow::Owned(out)
}

/// The JSON line of one decision (newline included).
pub fn format_record(
    policy: &RecordsPolicy,
    door: Door,
    request: &AccessRequest,
    decision: &Decision,
    now: SystemTime,
    weight: u64,
) -> String {
    let mut line = String::with_capacity(512);
    write_record(policy, door, request, decision, now, weight, &mut line);
    line
}

/// How many ALLOWs the one kept at `n` (counting from 0) stands for, at `rate` per million: those
/// from the one after the previous kept ALLOW up to it. Whole, and summed over the kept ones the
/// number of ALLOWs seen, whatever the rate.
fn sample_weight(n: u64, rate: u64) -> u64 {
    let kept = (n + 1) * rate / 1_000_000;
    let first_of = |k: u64| (k * 1_000_000).div_ceil(rate);
    first_of(kept) - first_of(kept - 1)
}

/// Appends the JSON line of one decision (newline included) to `out`.
///
/// Written field by field rather than through serde: a record is written for every decision, and
/// the intermediate structure (a dozen small allocations) cost as much as the writing. The bytes
/// are serde_json's for the same record (the test module holds that serde form and compares).
/// Fields: `time`, `door`, `request_id`, `method`, `host`, `path`, `operation`, `attributes`,
/// `source`, `client_certificate` (the one presented with a token bound to one: its thumbprint,
/// or `too_large` or `not_one_pem`),
/// `token` {`issuer`, `subject`, `tenant`, `client_id`, `acrs`, `acr`, `amr`, `auth_time`,
/// `scopes`, `roles`, `xms_cc`, `app_only`, `x5t#S256`, `claims`}, `outcome`, `reason`,
/// `status`, `weight` (a sampled ALLOW: how many it stands for), `rule`, `shadow`, `challenge` {`style`, `auth_contexts`, `acr_values`, `max_age`,
/// `amr`}; absent and empty ones are left out.
pub fn write_record(
    policy: &RecordsPolicy,
    door: Door,
    request: &AccessRequest,
    decision: &Decision,
    now: SystemTime,
    weight: u64,
    out: &mut String,
) {
    let http = request.http.as_ref();
    let mut cut = Cut::default();
    let target = http.map(|h| without_query_tokens(&h.target));
    let mut record = Fields::open(out);
    record.name(k!("time"));
    record.out.push('"');
    line::rfc3339_micros(now, record.out);
    record.out.push('"');
    record.word(k!("door"), door.as_str());
    record.maybe(
        k!("request_id"),
        cut.cap(
            "request_id",
            http.and_then(|h| h.headers.get("x-request-id")),
        ),
    );
    record.maybe(
        k!("method"),
        cut.cap("method", http.map(|h| h.method.as_str())),
    );
    record.maybe(k!("host"), cut.cap("host", http.map(|h| h.host_as_sent())));
    record.maybe(k!("path"), cut.cap("path", target.as_deref()));
    record.maybe(
        k!("operation"),
        cut.cap("operation", request.operation.as_deref()),
    );
    // Through Envoy an IP address; a direct `Check` caller may write anything there.
    let source = cut.cap(
        "source",
        request.source.as_ref().map(|s| s.address.as_str()),
    );
    record.list(k!("truncated"), cut.fields.iter().copied());
    if !policy.attributes.is_empty() {
        // Built as a map so that a name listed twice is written once, where it first stands.
        let attributes: Map<String, Value> = policy
            .attributes
            .iter()
            .filter_map(|name| Some((name.clone(), request.attributes.get(name)?.clone())))
            .collect();
        record.map(k!("attributes"), &attributes);
    }
    record.maybe(k!("source"), source);
    if let Some(presented) = &decision.client_certificate {
        record.text(
            k!("client_certificate"),
            &thumbprint::presented_text(presented),
        );
    }
    if let Some(t) = &decision.verified {
        record.name(k!("token"));
        write_token_once(policy, t, record.out);
    }
    record.word(k!("outcome"), decision.outcome.as_str());
    record.word(k!("reason"), decision.reason.as_str());
    record.number(k!("status"), i64::from(decision.http_status));
    if weight > 1 {
        // A sampled ALLOW: how many ALLOWs it stands for (replay counts it so many times).
        record.number(k!("weight"), i64::try_from(weight).unwrap_or(i64::MAX));
    }
    record.maybe(k!("rule"), decision.rule.as_deref());
    if !decision.risk_counts.is_empty() {
        record.name(k!("risk"));
        let mut risk = Fields::open(record.out);
        for (name, count) in &decision.risk_counts {
            risk.key(name);
            line::digits(*count, 1, risk.out);
        }
        risk.close();
    }
    if !decision.shadow.is_empty() {
        let shadow: Vec<String> = decision
            .shadow
            .iter()
            .map(|s| format!("{}:{}:{}", s.name(), s.outcome.as_str(), s.reason.as_str()))
            .collect();
        record.list(k!("shadow"), shadow.iter().map(String::as_str));
    }
    if let Some(s) = &decision.step_up {
        record.name(k!("challenge"));
        let mut challenge = Fields::open(record.out);
        challenge.text(k!("style"), s.style);
        challenge.list(
            k!("auth_contexts"),
            s.auth_contexts.iter().map(String::as_str),
        );
        challenge.list(k!("acr_values"), s.acr_values.iter().map(String::as_str));
        if let Some(max_age) = s.max_age {
            challenge.name(k!("max_age"));
            line::digits(max_age, 1, challenge.out);
        }
        challenge.list(k!("amr"), s.amr.iter().map(String::as_str));
        challenge.close();
    }
    record.close();
    out.push('\n');
}

/// The longest token part a thread keeps written (a token with large claims is written anew).
const KEPT_TOKEN_PART: usize = 4 * 1024;

/// [`write_token`], kept written for the last token this thread recorded: a token the cache
/// serves is one shared, immutable `VerifiedToken`, so the same token again (the same
/// allocation, held here so that it cannot be another's) under the same subject key writes the
/// same bytes, which are copied rather than escaped and formatted again, and a subject key's
/// HMAC is not computed again.
fn write_token_once(policy: &RecordsPolicy, t: &Arc<VerifiedToken>, out: &mut String) {
    struct Written {
        token: Arc<VerifiedToken>,
        subject_key: Option<SubjectKey>,
        part: String,
    }
    thread_local! {
        static LAST: RefCell<Option<Written>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        if let Some(w) = last
            && Arc::ptr_eq(&w.token, t)
            && w.subject_key == policy.subject_key
        {
            out.push_str(&w.part);
            return;
        }
        let start = out.len();
        write_token(policy, t, out);
        let part = &out[start..];
        if part.len() > KEPT_TOKEN_PART {
            *last = None;
            return;
        }
        match last {
            Some(w) => {
                w.token = Arc::clone(t);
                w.subject_key.clone_from(&policy.subject_key);
                w.part.clear();
                w.part.push_str(part);
            }
            None => {
                *last = Some(Written {
                    token: Arc::clone(t),
                    subject_key: policy.subject_key.clone(),
                    part: part.to_owned(),
                });
            }
        }
    });
}

/// What verification established about the token.
fn write_token(policy: &RecordsPolicy, t: &VerifiedToken, out: &mut String) {
    let p = &t.principal;
    let mut token = Fields::open(out);
    token.text(k!("issuer"), &p.issuer_id);
    match &policy.subject_key {
        None => token.text(k!("subject"), &p.subject),
        Some(key) => token.text(k!("subject"), &key.hash(&p.subject)),
    }
    token.maybe(k!("tenant"), p.tenant.as_deref());
    token.maybe(k!("client_id"), p.client_id.as_deref());
    token.list(k!("acrs"), p.acrs.iter().map(|s| &**s));
    token.maybe(k!("acr"), p.acr.as_deref());
    token.list(k!("amr"), p.amr.iter().map(|s| &**s));
    if let Some(auth_time) = p.auth_time {
        token.number(k!("auth_time"), auth_time);
    }
    token.list(k!("scopes"), p.scopes.iter().map(|s| &**s));
    token.list(k!("roles"), p.roles.iter().map(|s| &**s));
    token.list(k!("xms_cc"), t.client_capabilities.iter().map(|s| &**s));
    if p.app_only {
        token.name(k!("app_only"));
        token.out.push_str("true");
    }
    if let Some(bound) = t.certificate_binding.as_deref() {
        token.text(k!("x5t#S256"), &thumbprint::encode(bound));
    }
    // The raw claims the policy reads (claim requirements, `claim:` headers, CEL); with a
    // subject key, `sub` among them as the subject is, or the hash would stand beside the name,
    // and so is an `oid` that is the subject (an issuer with `subject_claim: oid`).
    if !t.claims.is_empty() {
        match &policy.subject_key {
            Some(key) if hashed_claims(&t.claims, &p.subject).next().is_some() => {
                let mut claims = t.claims.clone();
                for (name, value) in hashed_claims(&t.claims, &p.subject) {
                    claims.insert(name.to_owned(), Value::from(key.hash(value)));
                }
                token.map(k!("claims"), &claims);
            }
            _ => token.map(k!("claims"), &t.claims),
        }
    }
    token.close();
}

/// The recorded claims a subject key hashes: `sub`, and `oid` when it is the subject.
fn hashed_claims<'c>(
    claims: &'c serde_json::Map<String, Value>,
    subject: &'c str,
) -> impl Iterator<Item = (&'static str, &'c str)> {
    ["sub", "oid"]
        .into_iter()
        .filter_map(move |name| match claims.get(name) {
            Some(Value::String(value)) if name == "sub" || value == subject => {
                Some((name, &**value))
            }
            _ => None,
        })
}

/// A member name of the record's own (plain ASCII: nothing to escape), written with the comma
/// that separates it from the one before and its colon: `k!("door")` is `,"door":`.
#[derive(Clone, Copy)]
struct Key(&'static str);

macro_rules! k {
    ($name:literal) => {
        Key(concat!(",\"", $name, "\":"))
    };
}
use k;

/// One JSON object being written: its members are separated as they come.
struct Fields<'o> {
    out: &'o mut String,
    first: bool,
}

impl<'o> Fields<'o> {
    fn open(out: &'o mut String) -> Self {
        out.push('{');
        Self { out, first: true }
    }

    /// Starts the member `name`, one of the record's own, in one piece.
    fn name(&mut self, Key(name): Key) {
        let name = if std::mem::take(&mut self.first) {
            &name[1..]
        } else {
            name
        };
        self.out.push_str(name);
    }

    /// Starts a member whose name comes from outside (a claim's, an attribute's): escaped.
    fn key(&mut self, key: &str) {
        self.separate();
        line::string(key, self.out);
        self.out.push(':');
    }

    fn separate(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.out.push(',');
        }
    }

    fn text(&mut self, name: Key, value: &str) {
        self.name(name);
        line::string(value, self.out);
    }

    /// A value of stepgate's own (a door, an outcome, a reason code: lower-case words and `_`),
    /// which has nothing to escape: written as it is, without the escape scan.
    fn word(&mut self, name: Key, value: &'static str) {
        debug_assert!(
            value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{value:?} is not a plain word"
        );
        self.name(name);
        self.out.push('"');
        self.out.push_str(value);
        self.out.push('"');
    }

    fn maybe(&mut self, name: Key, value: Option<&str>) {
        if let Some(value) = value {
            self.text(name, value);
        }
    }

    fn number(&mut self, name: Key, value: i64) {
        self.name(name);
        if value < 0 {
            self.out.push('-');
        }
        line::digits(value.unsigned_abs(), 1, self.out);
    }

    /// An array of strings; left out when empty.
    fn list<'s>(&mut self, name: Key, items: impl ExactSizeIterator<Item = &'s str>) {
        if items.len() == 0 {
            return;
        }
        self.name(name);
        self.out.push('[');
        for (i, item) in items.enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            line::string(item, self.out);
        }
        self.out.push(']');
    }

    /// A JSON object of arbitrary values, in the map's order; left out when empty.
    fn map(&mut self, name: Key, map: &Map<String, Value>) {
        if map.is_empty() {
            return;
        }
        self.name(name);
        let mut inner = Fields::open(self.out);
        for (key, value) in map {
            inner.key(key);
            // serde_json's own compact form of the value (its `Display`).
            let _ = write!(inner.out, "{value}");
        }
        inner.close();
    }

    fn close(self) {
        self.out.push('}');
    }
}

/// The key subjects are recorded under (`records.subject_key_file`), prepared once: its HMAC
/// pads are hashed when the policy is compiled, not for every record. Two are equal when their
/// bytes are.
#[derive(Clone)]
pub struct SubjectKey {
    bytes: Vec<u8>,
    key: aws_lc_rs::hmac::Key,
}

impl SubjectKey {
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            bytes: bytes.to_vec(),
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes),
        }
    }

    /// `hmac-sha256:` and the first 32 hex digits of HMAC-SHA256(key, subject).
    pub fn hash(&self, subject: &str) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let tag = aws_lc_rs::hmac::sign(&self.key, subject.as_bytes());
        let mut out = String::with_capacity(12 + 32);
        out.push_str("hmac-sha256:");
        for b in &tag.as_ref()[..16] {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }
}

impl PartialEq for SubjectKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

/// The file (rotated by size) or stdout.
enum Output {
    Stdout(io::Stdout),
    File {
        path: PathBuf,
        file: File,
        written: u64,
        max_bytes: u64,
        keep: u32,
        /// When `path` was last checked to still name `file`.
        checked: Instant,
    },
}

/// How often the records file's path is checked to still name the file being written.
const PATH_CHECK: Duration = Duration::from_secs(1);

impl Output {
    fn open(path: Option<&Path>, max_bytes: u64, keep: u32) -> io::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::Stdout(io::stdout()));
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        Ok(Self::File {
            path: path.to_owned(),
            file,
            written,
            max_bytes,
            keep,
            checked: Instant::now(),
        })
    }

    /// Writes whole records (`chunk` ends with a newline), rotating first when they would take
    /// the file past its size. A file deleted or moved away (by hand, or by a log rotator that
    /// does not signal) is opened again at its path, rather than written to where nobody reads
    /// it; a write that fails leaves no record cut short in the file.
    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self {
            Self::Stdout(out) => out.write_all(chunk).and_then(|()| out.flush()),
            Self::File {
                path,
                file,
                written,
                max_bytes,
                keep,
                checked,
            } => {
                if checked.elapsed() >= PATH_CHECK {
                    *checked = Instant::now();
                    if !names(path, file) {
                        *file = OpenOptions::new().create(true).append(true).open(&*path)?;
                        *written = file.metadata()?.len();
                        tracing::warn!(
                            path = %path.display(),
                            "the decision records file was deleted or moved away: writing to a new one at its path"
                        );
                    }
                }
                if *written > 0 && *written + chunk.len() as u64 > *max_bytes {
                    rotate(path, *keep)?;
                    *file = OpenOptions::new().create(true).append(true).open(&*path)?;
                    *written = 0;
                }
                let before = file.metadata()?.len();
                if let Err(error) = file.write_all(chunk) {
                    // Part of the chunk may be in (a disk full): cut it off, or the next record
                    // would be written on the end of one cut short.
                    if file.metadata().is_ok_and(|m| m.len() > before) {
                        let _ = file.set_len(before);
                    }
                    return Err(error);
                }
                *written = before + chunk.len() as u64;
                Ok(())
            }
        }
    }
}

/// Whether `path` names the open `file` (the same device and inode).
fn names(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(named), Ok(open)) => named.dev() == open.dev() && named.ino() == open.ino(),
        _ => false,
    }
}

/// `path` → `path.1`, `path.1` → `path.2`, …, dropping `path.<keep>`. A `path` that is gone
/// (deleted meanwhile) leaves nothing to rotate.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if !path.exists() {
        return Ok(());
    }
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(numbered(keep));
    for n in (1..keep).rev() {
        let from = numbered(n);
        if from.exists() {
            std::fs::rename(&from, numbered(n + 1))?;
        }
    }
    std::fs::rename(path, numbered(1))
}

fn write_loop(shared: &Shared, mut out: Output) {
    super::writer::lowest_priority();
    let mut spare: Vec<u8> = Vec::new();
    let mut failing = false;
    loop {
        let (records, finishing) = {
            let mut pending = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if pending.bytes.is_empty() && !pending.finishing {
                // Nothing to write: sleep until the next record, not for a timer.
                pending.idle = true;
                pending = shared
                    .wake
                    .wait_while(pending, |p| p.bytes.is_empty() && !p.finishing)
                    .unwrap_or_else(PoisonError::into_inner);
                pending.idle = false;
                pending.woken = false;
            }
            let (mut pending, _) = shared
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| {
                    p.bytes.len() < WAKE_AT && !p.finishing
                })
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut pending.bytes, &mut spare);
            pending.woken = false;
            (std::mem::take(&mut pending.records), pending.finishing)
        };
        if spare.is_empty() {
            if finishing {
                break;
            }
            continue;
        }
        // Whole records at a time, so that a rotation falls between two of them.
        let mut result = Ok(());
        for chunk in chunks_of_lines(&spare, 1024 * 1024) {
            result = out.write(chunk);
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
                metrics::global().record_records(RecordEvent::Written, records);
                if failing {
                    tracing::info!("decision records are written again");
                    failing = false;
                }
            }
            Err(err) => {
                metrics::global().record_records(RecordEvent::Dropped, records);
                if !failing {
                    tracing::error!(error = %err, "cannot write decision records; they are dropped and counted");
                    failing = true;
                }
            }
        }
        spare.clear();
        if finishing {
            break;
        }
    }
    let mut pending = shared
        .pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    pending.finished = true;
    shared.done.notify_all();
}

/// `bytes` cut after a newline into pieces of at most about `size` bytes.
fn chunks_of_lines(bytes: &[u8], size: usize) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= size {
            rest.len()
        } else {
            rest[..size]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(rest.len(), |at| at + 1)
        };
        let (chunk, tail) = rest.split_at(cut);
        rest = tail;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    //! The hand-written record against the serde form it replaced, byte for byte.

    use std::time::{Duration, UNIX_EPOCH};

    use proptest::prelude::*;
    use serde::Serialize;

    use super::*;

    /// A per-second allowance: `per_second` admitted in a second, none more, and a new second
    /// starts over; two counters do not share it.
    #[test]
    fn an_allowance_admits_so_many_a_second_each() {
        let (refusals, unverified) = (AtomicU64::new(0), AtomicU64::new(0));
        let admitted = |counter: &AtomicU64, second| {
            (0..50)
                .filter(|_| admit(counter, REFUSALS_PER_SECOND, second))
                .count()
        };
        assert_eq!(admitted(&refusals, 100), 10);
        assert_eq!(admitted(&refusals, 100), 0);
        assert_eq!(admitted(&unverified, 100), 10, "a counter of its own");
        assert_eq!(admitted(&refusals, 101), 10);
    }
    use crate::{
        decision::{Reason, Shadow, StepUp},
        identity::claims::Principal,
        request::{HttpAttributes, Peer},
    };

    /// A records file deleted, or moved away without the writer being told, is opened again at
    /// its path within a second: records are not written on into a file nobody reads, and a
    /// rotation with the file gone rotates nothing rather than failing every write after it.
    #[test]
    fn a_records_file_deleted_or_moved_away_is_opened_again_at_its_path() {
        let dir =
            std::env::temp_dir().join(format!("stepgate-records-gone-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("decisions.jsonl");
        let mut out = Output::open(Some(&path), 64, 2).unwrap();
        let age = |out: &mut Output| {
            if let Output::File { checked, .. } = out {
                *checked = Instant::now() - PATH_CHECK;
            }
        };
        out.write(b"{\"n\":1}\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        age(&mut out);
        out.write(b"{\"n\":2}\n").unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"n\":2}\n",
            "a new file at the path"
        );
        std::fs::rename(&path, dir.join("elsewhere.jsonl")).unwrap();
        age(&mut out);
        out.write(b"{\"n\":3}\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"n\":3}\n");
        // Deleted when the next records would rotate it: nothing to rotate, and written.
        std::fs::remove_file(&path).unwrap();
        out.write(&[b'x'; 63]).unwrap_or_else(|e| panic!("{e}"));
        assert!(path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn with_nothing_to_write_the_writer_sleeps_until_a_record_arrives() {
        let path = std::env::temp_dir().join(format!(
            "stepgate-records-idle-{}.jsonl",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let sink = RecordSink::open(Some(&path), 1 << 20, 1).unwrap();
        let state = |holds: &dyn Fn(&Pending) -> bool| {
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < until {
                if holds(&sink.shared.pending.lock().unwrap()) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        };
        assert!(
            state(&|p| p.idle),
            "with nothing pending the writer sleeps without a timer"
        );
        sink.enqueue(b"{\"record\":1}\n");
        assert!(
            state(&|p| p.bytes.is_empty() && p.idle),
            "the record woke the writer, was written, and the writer sleeps again"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"record\":1}\n");
        sink.finish();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn unverified_records_are_counted_per_second_across_threads() {
        let sink = RecordSink {
            shared: Arc::default(),
            seen: AtomicU64::new(0),
            unverified: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            target: "test".into(),
        };
        let admitted = |second| {
            std::thread::scope(|scope| {
                let threads: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| (0..50).filter(|_| sink.admit_unverified(7, second)).count())
                    })
                    .collect();
                threads
                    .into_iter()
                    .map(|t| t.join().unwrap())
                    .sum::<usize>()
            })
        };
        assert_eq!(admitted(1_000), 7);
        assert_eq!(admitted(1_001), 7, "a new second starts a new count");
        assert_eq!(admitted(1_001), 0, "the second's share is spent");
        assert_eq!(admitted(900), 7, "a clock set back starts a new count too");
        assert_eq!(admitted(u32::MAX), 7);
    }

    #[derive(Serialize)]
    struct Record<'a> {
        time: String,
        door: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        method: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        path: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        operation: Option<&'a str>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        truncated: Vec<&'static str>,
        #[serde(skip_serializing_if = "Map::is_empty")]
        attributes: Map<String, Value>,
        #[serde(skip_serializing_if = "Option::is_none")]
        source: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_certificate: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<TokenFacts<'a>>,
        outcome: &'static str,
        reason: &'static str,
        status: u16,
        #[serde(skip_serializing_if = "is_one")]
        weight: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<&'a str>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        shadow: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        challenge: Option<Challenge<'a>>,
    }

    #[derive(Serialize)]
    struct TokenFacts<'a> {
        issuer: &'a str,
        subject: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        tenant: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        acrs: Vec<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        acr: Option<&'a str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        amr: Vec<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        auth_time: Option<i64>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        scopes: Vec<&'a str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        roles: Vec<&'a str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        xms_cc: Vec<&'a str>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        app_only: bool,
        #[serde(rename = "x5t#S256", skip_serializing_if = "Option::is_none")]
        x5t_s256: Option<String>,
        #[serde(skip_serializing_if = "Map::is_empty")]
        claims: Map<String, Value>,
    }

    #[derive(Serialize)]
    struct Challenge<'a> {
        style: &'static str,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        auth_contexts: &'a [String],
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        acr_values: &'a [String],
        #[serde(skip_serializing_if = "Option::is_none")]
        max_age: Option<u64>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        amr: &'a [String],
    }

    /// The record as serde_json writes it: the reference.
    /// `hmac-sha256:` and the first 32 hex digits of HMAC-SHA256(key, subject), computed
    /// here from the key's bytes, as the records' reference.
    fn keyed_hash(key: &[u8], subject: &str) -> String {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
        let tag = aws_lc_rs::hmac::sign(&key, subject.as_bytes());
        let hex: String = tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("hmac-sha256:{hex}")
    }

    fn is_one(n: &u64) -> bool {
        *n == 1
    }

    fn serde_record(
        policy: &RecordsPolicy,
        door: Door,
        request: &AccessRequest,
        decision: &Decision,
        now: SystemTime,
        weight: u64,
    ) -> String {
        let http = request.http.as_ref();
        fn words(list: &[Arc<str>]) -> Vec<&str> {
            list.iter().map(|s| &**s).collect()
        }
        let mut time = String::new();
        line::rfc3339_micros(now, &mut time);
        let mut cut = Cut::default();
        let target = http.map(|h| without_query_tokens(&h.target));
        let record = Record {
            time,
            door: door.as_str(),
            request_id: cut.cap(
                "request_id",
                http.and_then(|h| h.headers.get("x-request-id")),
            ),
            method: cut.cap("method", http.map(|h| h.method.as_str())),
            host: cut.cap("host", http.map(|h| h.host_as_sent())),
            path: cut.cap("path", target.as_deref()),
            operation: cut.cap("operation", request.operation.as_deref()),
            source: cut.cap(
                "source",
                request.source.as_ref().map(|s| s.address.as_str()),
            ),
            truncated: cut.fields,
            attributes: policy
                .attributes
                .iter()
                .filter_map(|name| Some((name.clone(), request.attributes.get(name)?.clone())))
                .collect(),
            client_certificate: decision
                .client_certificate
                .as_deref()
                .map(thumbprint::presented_text),
            token: decision.verified.as_deref().map(|t| {
                let p = &t.principal;
                TokenFacts {
                    issuer: &p.issuer_id,
                    subject: match &policy.subject_key {
                        None => p.subject.to_string(),
                        Some(key) => keyed_hash(&key.bytes, &p.subject),
                    },
                    tenant: p.tenant.as_deref(),
                    client_id: p.client_id.as_deref(),
                    acrs: words(&p.acrs),
                    acr: p.acr.as_deref(),
                    amr: words(&p.amr),
                    auth_time: p.auth_time,
                    scopes: words(&p.scopes),
                    roles: words(&p.roles),
                    xms_cc: words(&t.client_capabilities),
                    app_only: p.app_only,
                    x5t_s256: t.certificate_binding.as_deref().map(thumbprint::encode),
                    claims: {
                        let mut claims = t.claims.clone();
                        if let Some(key) = &policy.subject_key {
                            for name in ["sub", "oid"] {
                                if let Some(Value::String(value)) = claims.get(name)
                                    && (name == "sub" || **value == *p.subject)
                                {
                                    let hashed = keyed_hash(&key.bytes, value);
                                    claims.insert(name.to_owned(), Value::from(hashed));
                                }
                            }
                        }
                        claims
                    },
                }
            }),
            outcome: decision.outcome.as_str(),
            reason: decision.reason.as_str(),
            status: decision.http_status,
            weight,
            rule: decision.rule.as_deref(),
            shadow: decision
                .shadow
                .iter()
                .map(|s| format!("{}:{}:{}", s.name(), s.outcome.as_str(), s.reason.as_str()))
                .collect(),
            challenge: decision.step_up.as_ref().map(|s| Challenge {
                style: s.style,
                auth_contexts: &s.auth_contexts,
                acr_values: &s.acr_values,
                max_age: s.max_age,
                amr: &s.amr,
            }),
        };
        let mut line = serde_json::to_string(&record).expect("records serialize");
        line.push('\n');
        line
    }

    /// Text with what JSON must escape (quotes, backslashes, every control character), non-ASCII
    /// and plain words.
    fn text() -> impl Strategy<Value = String> {
        "[a-z0-9 /:.\"\\\\\u{0}-\u{1f}\u{7f}é€😀]{0,10}"
    }

    fn texts() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(text(), 0..3)
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            text().prop_map(Value::from),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
                prop::collection::vec((text(), inner), 0..3)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        // `sub` and `oid` among them now and then: a subject key hashes them there too.
        let name = prop_oneof![
            3 => text(),
            1 => Just("sub".to_owned()),
            1 => Just("oid".to_owned())
        ];
        prop::collection::vec((name, value()), 0..3).prop_map(|kv| kv.into_iter().collect())
    }

    fn arcs(list: Vec<String>) -> Arc<[Arc<str>]> {
        list.into_iter().map(Arc::from).collect()
    }

    prop_compose! {
        fn principal()(
            issuer_id in text(), subject in text(),
            tenant in prop::option::of(text()), client_id in prop::option::of(text()),
            acrs in texts(), acr in prop::option::of(text()), amr in texts(),
            auth_time in prop::option::of(any::<i64>()),
            scopes in texts(), roles in texts(), app_only in any::<bool>(),
        ) -> Principal {
            Principal {
                issuer_id: issuer_id.into(),
                subject: subject.into(),
                tenant: tenant.map(Arc::from),
                client_id: client_id.map(Arc::from),
                acrs: arcs(acrs),
                acr: acr.map(Arc::from),
                amr: arcs(amr),
                auth_time,
                scopes: arcs(scopes),
                roles: arcs(roles),
                app_only,
                ..Principal::default()
            }
        }
    }

    prop_compose! {
        fn request()(
            http in prop::option::of((text(), text(), text(), prop::option::of(text()))),
            operation in prop::option::of(text()),
            attributes in object(),
            source in prop::option::of(text()),
        ) -> AccessRequest {
            AccessRequest {
                http: http.map(|(method, host, target, id)| {
                    let mut h = HttpAttributes { method, host, target, ..Default::default() };
                    if let Some(id) = id {
                        h.headers.insert("x-request-id", id);
                    }
                    h
                }),
                operation,
                attributes,
                source: source.map(|address| Peer { address, ..Peer::default() }),
                ..AccessRequest::default()
            }
        }
    }

    type StepUpParts = (Vec<String>, Vec<String>, Option<u64>, Vec<String>);

    prop_compose! {
        fn decision()(
            outcome in 0..3usize, reason in 0..Reason::ALL.len(), status in any::<u16>(),
            rule in prop::option::of(text()),
            shadow in prop::collection::vec((text(), prop::option::of(0..4usize)), 0..3),
            step_up in prop::option::of((texts(), texts(), prop::option::of(any::<u64>()), texts())),
            token in prop::option::of((principal(), texts(), object())),
        ) -> (Decision, Option<(Principal, Vec<String>, Map<String, Value>)>, Option<StepUpParts>) {
            let outcome = [Outcome::Allow, Outcome::StepUp, Outcome::Deny][outcome];
            let mut d = Decision::new(outcome, Reason::ALL[reason], "", status);
            d.rule = rule.map(Arc::from);
            d.shadow = shadow
                .into_iter()
                .map(|(rule, escalation)| Shadow {
                    rule: rule.into(),
                    escalation,
                    outcome,
                    reason: Reason::ALL[reason],
                })
                .collect();
            (d, token, step_up)
        }
    }

    fn verified(
        principal: Principal,
        capabilities: Vec<String>,
        claims: Map<String, Value>,
        certificate_binding: Option<crate::identity::Thumbprint>,
    ) -> Arc<VerifiedToken> {
        static ISSUER: std::sync::LazyLock<Arc<crate::identity::issuer::Issuer>> =
            std::sync::LazyLock::new(|| {
                let policy =
                    crate::policy::testing::compile_policy(crate::policy::testing::DEMO_POLICY);
                let issuer = policy.issuers.iter().next().map(Arc::clone);
                issuer.expect("the demo policy has an issuer")
            });
        Arc::new(VerifiedToken {
            issuer: Arc::clone(&ISSUER),
            kid: None,
            key_binding: [0; 32],
            admin_only: false,
            principal: Arc::new(principal),
            client_capabilities: arcs(capabilities),
            claims,
            fingerprint_digest: None,
            certificate_binding: certificate_binding.map(Box::new),
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The query rewritten is the query built again from its pairs, the value of each pair
        /// whose name reads `access_token` (however encoded) replaced: nothing else moves.
        #[test]
        fn only_query_token_values_are_redacted(
            path in "/[a-z/=&;?]{0,8}",
            pairs in prop::collection::vec(
                (
                    prop_oneof![
                        Just("access_token"), Just("%61ccess_token"), Just("access%5Ftoken"),
                        Just("access_tokens"), Just("x"), Just(""),
                    ],
                    prop::option::of("[a-zA-Z0-9._%+=-]{0,6}"),
                    prop_oneof![Just('&'), Just(';')],
                ),
                0..6,
            ),
        ) {
            let is_token = |name: &str| {
                matches!(name, "access_token" | "%61ccess_token" | "access%5Ftoken")
            };
            let (mut query, mut expected) = (String::new(), String::new());
            for (i, (name, value, separator)) in pairs.iter().enumerate() {
                if i > 0 {
                    query.push(*separator);
                    expected.push(*separator);
                }
                query.push_str(name);
                expected.push_str(name);
                if let Some(value) = value {
                    query.push('=');
                    query.push_str(value);
                    expected.push('=');
                    expected.push_str(if is_token(name) { "REDACTED" } else { value });
                }
            }
            // A path with `?` in it already holds the query's start.
            let target = format!("{}?{query}", path.replace('?', ""));
            let wanted = format!("{}?{expected}", path.replace('?', ""));
            let redacted = without_query_tokens(&target);
            // A value may itself hold `=`: only the first `=` of a pair ends its name.
            prop_assert_eq!(redacted.as_ref(), wanted.as_str());
            if redacted.contains("REDACTED") {
                prop_assert!(pairs.iter().any(|(n, v, _)| is_token(n) && v.is_some()));
            }
        }

        #[test]
        fn the_written_record_is_serde_jsons_byte_for_byte(
            request in request(),
            (mut decision, token, step_up) in decision(),
            attributes in prop::collection::vec(prop_oneof![text(), "[a-c]"], 0..4),
            hashed in any::<bool>(),
            weight in prop_oneof![Just(1u64), 2..1_000_000u64],
            door in 0..3usize,
            nanos in 0..4_102_444_800_000_000_000u64,
            bound in prop::option::of(any::<u8>()),
            presented in prop::option::of(any::<u8>()),
        ) {
            decision.verified = token.map(|(principal, caps, claims)| {
                verified(principal, caps, claims, bound.map(|b| [b; 32]))
            });
            decision.client_certificate = presented.map(|b| {
                Box::new(match b {
                    0 => Err(crate::identity::CertificateProblem::NotOnePem),
                    1 => Err(crate::identity::CertificateProblem::TooLarge),
                    b => Ok([b; 32]),
                })
            });
            decision.step_up = step_up.map(|(auth_contexts, acr_values, max_age, amr)| {
                Box::new(StepUp {
                    style: "entra",
                    auth_contexts,
                    acr_values,
                    max_age,
                    amr,
                    ..StepUp::default()
                })
            });
            let policy = RecordsPolicy {
                attributes,
                subject_key: hashed.then(|| SubjectKey::new(b"records key")),
                ..RecordsPolicy::default()
            };
            let door = [Door::Check, Door::Decide, Door::Offline][door];
            let now = UNIX_EPOCH + Duration::from_nanos(nanos);
            let written = format_record(&policy, door, &request, &decision, now, weight);
            prop_assert_eq!(
                &written,
                &serde_record(&policy, door, &request, &decision, now, weight)
            );
            prop_assert_eq!(written.matches('\n').count(), 1);
        }
    }

    /// The kept ALLOWs' weights add up to every ALLOW seen up to the last kept one, at any rate,
    /// and each is the gap the sampling left before it.
    #[test]
    fn sampled_allows_weigh_what_they_stand_for() {
        for rate in [
            1, 3, 10_000, 100_000, 250_000, 300_000, 333_333, 500_000, 999_999,
        ] {
            let (mut total, mut last_kept) = (0, None);
            for n in 0..20_000u64 {
                if (n + 1) * rate / 1_000_000 != n * rate / 1_000_000 {
                    let weight = sample_weight(n, rate);
                    assert_eq!(
                        weight,
                        n - last_kept.map_or(0, |k| k + 1) + 1,
                        "rate {rate}, n {n}"
                    );
                    total += weight;
                    last_kept = Some(n);
                }
            }
            if let Some(last) = last_kept {
                assert_eq!(total, last + 1, "rate {rate}");
            }
        }
        assert_eq!(sample_weight(9, 100_000), 10);
        assert_eq!(sample_weight(3, 250_000), 4);
    }

    /// With a subject key, the claims naming the subject are hashed as the subject is: `sub`,
    /// and an `oid` that is the subject (`subject_claim: oid`), not another `oid`.
    #[test]
    fn a_subject_key_hashes_the_claims_that_name_the_subject() {
        let policy = RecordsPolicy {
            subject_key: Some(SubjectKey::new(b"records key")),
            ..RecordsPolicy::default()
        };
        let record = |subject: &str| {
            let mut decision = Decision::new(Outcome::Allow, Reason::Allowed, "", 200);
            let claims = serde_json::json!({"sub": "pairwise-1", "oid": "oid-7", "upn": "u@x"});
            decision.verified = Some(verified(
                Principal {
                    subject: subject.into(),
                    ..Principal::default()
                },
                Vec::new(),
                claims.as_object().unwrap().clone(),
                None,
            ));
            let request = AccessRequest::default();
            let line = format_record(&policy, Door::Decide, &request, &decision, UNIX_EPOCH, 1);
            assert_eq!(
                line,
                serde_record(&policy, Door::Decide, &request, &decision, UNIX_EPOCH, 1)
            );
            serde_json::from_str::<Value>(&line).unwrap()["token"].clone()
        };
        let hash = |value: &str| Value::from(keyed_hash(b"records key", value));
        let by_oid = record("oid-7");
        assert_eq!(by_oid["subject"], hash("oid-7"));
        assert_eq!(by_oid["claims"]["oid"], hash("oid-7"));
        assert_eq!(by_oid["claims"]["sub"], hash("pairwise-1"));
        assert_eq!(by_oid["claims"]["upn"], "u@x");
        let by_sub = record("pairwise-1");
        assert_eq!(by_sub["subject"], hash("pairwise-1"));
        assert_eq!(by_sub["claims"]["sub"], hash("pairwise-1"));
        assert_eq!(
            by_sub["claims"]["oid"], "oid-7",
            "not the subject: as it is"
        );
    }

    /// A thread keeps the token part it last wrote: the same token again is written as it was
    /// under the same subject key, and anew under another key or for another token.
    #[test]
    fn a_token_written_again_is_written_as_its_settings_say() {
        let plain = RecordsPolicy::default();
        let keyed = RecordsPolicy {
            subject_key: Some(SubjectKey::new(b"records key")),
            ..RecordsPolicy::default()
        };
        let other_key = RecordsPolicy {
            subject_key: Some(SubjectKey::new(b"another key")),
            ..RecordsPolicy::default()
        };
        let token = |subject: &str| {
            verified(
                Principal {
                    subject: subject.into(),
                    ..Principal::default()
                },
                Vec::new(),
                serde_json::json!({"sub": subject})
                    .as_object()
                    .unwrap()
                    .clone(),
                None,
            )
        };
        let record = |policy: &RecordsPolicy, token: &Arc<VerifiedToken>| {
            let mut decision = Decision::new(Outcome::Allow, Reason::Allowed, "", 200);
            decision.verified = Some(Arc::clone(token));
            let request = AccessRequest::default();
            let line = format_record(policy, Door::Decide, &request, &decision, UNIX_EPOCH, 1);
            assert_eq!(
                line,
                serde_record(policy, Door::Decide, &request, &decision, UNIX_EPOCH, 1)
            );
            serde_json::from_str::<Value>(&line).unwrap()["token"]["subject"].clone()
        };
        let alice = token("alice");
        let hash = |key: &[u8]| Value::from(keyed_hash(key, "alice"));
        for _ in 0..2 {
            assert_eq!(record(&plain, &alice), "alice");
        }
        assert_eq!(record(&keyed, &alice), hash(b"records key"));
        assert_eq!(record(&keyed, &alice), hash(b"records key"));
        assert_eq!(record(&other_key, &alice), hash(b"another key"));
        assert_eq!(record(&plain, &alice), "alice");
        assert_eq!(record(&plain, &token("bob")), "bob");
        assert_eq!(record(&plain, &alice), "alice");
    }

    #[test]
    fn long_request_text_is_cut_at_a_character_boundary_and_named() {
        let long_path = format!("/{}", "é".repeat(MAX_RECORDED_TEXT));
        let request = AccessRequest {
            http: Some(HttpAttributes {
                method: "GET".into(),
                host: "app.example".into(),
                target: long_path.clone(),
                ..Default::default()
            }),
            operation: Some("\u{1}".repeat(5 * MAX_RECORDED_TEXT)),
            source: Some(Peer::new(&"9".repeat(1 << 20), String::new())),
            ..AccessRequest::default()
        };
        let decision = Decision::new(Outcome::Deny, Reason::MalformedRequest, "", 400);
        let policy = RecordsPolicy::default();
        let line = format_record(&policy, Door::Decide, &request, &decision, UNIX_EPOCH, 1);
        assert_eq!(
            line,
            serde_record(&policy, Door::Decide, &request, &decision, UNIX_EPOCH, 1)
        );
        let record: Value = serde_json::from_str(&line).unwrap();
        let path = record["path"].as_str().unwrap();
        assert!(long_path.starts_with(path));
        assert!((MAX_RECORDED_TEXT - 1..=MAX_RECORDED_TEXT).contains(&path.len()));
        let operation = record["operation"].as_str().unwrap();
        assert_eq!(operation.len(), MAX_RECORDED_TEXT);
        assert_eq!(record["source"].as_str().unwrap().len(), MAX_RECORDED_TEXT);
        assert_eq!(
            record["truncated"],
            serde_json::json!(["path", "operation", "source"])
        );
        assert_eq!(record["host"], "app.example");
        // Escaped, the control characters take six bytes each: still bounded.
        assert!(line.len() < 10 * MAX_RECORDED_TEXT, "{}", line.len());
    }

    #[test]
    fn a_query_token_is_never_recorded_whatever_the_spelling_of_its_name() {
        for (target, recorded) in [
            ("/a?access_token=eyJ.x.y", "/a?access_token=REDACTED"),
            (
                "/a?x=1&access_token=eyJ.x.y&y=2",
                "/a?x=1&access_token=REDACTED&y=2",
            ),
            ("/a?%61ccess_token=eyJ", "/a?%61ccess_token=REDACTED"),
            ("/a?access_token[]=eyJ.x.y", "/a?access_token[]=REDACTED"),
            (
                "/a?access_token%5B0%5D=eyJ.x.y",
                "/a?access_token%5B0%5D=REDACTED",
            ),
            (
                "/a?access_token=1&access_token=2",
                "/a?access_token=REDACTED&access_token=REDACTED",
            ),
            ("/a?access_token", "/a?access_token"),
            (
                "/a?x=1;access_token=eyJ.x.y;y=2&z",
                "/a?x=1;access_token=REDACTED;y=2&z",
            ),
            ("/a?x=1&", "/a?x=1&"),
            ("/a?my_access_token=keep&b", "/a?my_access_token=keep&b"),
            (
                "/cb?code=OAUTHCODE&state=s&Refresh_Token=RT&client%5Fsecret=CS&sig=S",
                "/cb?code=REDACTED&state=s&Refresh_Token=REDACTED&client%5Fsecret=REDACTED&sig=REDACTED",
            ),
            ("/a?codec=h264&keys=1", "/a?codec=h264&keys=1"),
            // As PHP reads the names: renamed, or arrays of them.
            (
                "/a?client.secret=CS1&refresh_token[]=RT2&api_key%5B0%5D=K3&+code=C4&%20code=C5&x=1",
                "/a?client.secret=REDACTED&refresh_token[]=REDACTED&api_key%5B0%5D=REDACTED&+code=REDACTED&%20code=REDACTED&x=1",
            ),
            (
                "/a?X-Amz-Signature=S&subject_token=T&SAMLResponse=R",
                "/a?X-Amz-Signature=REDACTED&subject_token=REDACTED&SAMLResponse=REDACTED",
            ),
            (
                "/a?user[password]=P&credentials%5Bclient_secret%5D=C&private_token=T&user[name]=n",
                "/a?user[password]=REDACTED&credentials%5Bclient_secret%5D=REDACTED&private_token=REDACTED&user[name]=n",
            ),
            ("/access_token=x", "/access_token=x"),
        ] {
            assert_eq!(without_query_tokens(target), recorded, "{target}");
            let request = AccessRequest {
                http: Some(HttpAttributes {
                    method: "GET".into(),
                    host: "app.example".into(),
                    target: target.into(),
                    ..Default::default()
                }),
                ..AccessRequest::default()
            };
            let decision = Decision::new(Outcome::Deny, Reason::TokenMissing, "", 401);
            let line = format_record(
                &RecordsPolicy::default(),
                Door::Check,
                &request,
                &decision,
                UNIX_EPOCH,
                1,
            );
            assert!(!line.contains("eyJ"), "{line}");
        }
    }
}
