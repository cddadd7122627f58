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
//! - **The request path never waits.** It formats the line and hands it to a bounded queue; a
//!   writer thread appends to the file (or stdout) and rotates it by size. A full queue drops the
//!   record and counts it (`stepgate_records_dropped_total`).

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    thread,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use serde_json::{Map, Value};

use super::metrics;
use crate::{
    decision::{Decision, Outcome},
    identity::VerifiedToken,
    request::{AccessRequest, Door},
};

/// Bytes of records waiting for the writer; past it, records are dropped and counted.
const CAPACITY: usize = 4 * 1024 * 1024;
/// Pending bytes that wake the writer early (a wake-up per record would cost a context switch
/// each: most of a record's price).
const WAKE_AT: usize = 256 * 1024;
/// Longest a record waits in memory.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

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
    /// Decide attributes recorded.
    pub attributes: Vec<String>,
    /// When set, subjects are recorded as HMAC-SHA256 under this key (hex, 32 digits).
    pub subject_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for RecordsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordsPolicy")
            .field("enabled", &self.enabled)
            .field("path", &self.path)
            .field("allow_sample_ppm", &self.allow_sample_ppm)
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
    target: String,
}

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct Pending {
    bytes: Vec<u8>,
    /// Records in `bytes`.
    records: u64,
    woken: bool,
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
            target,
        }))
    }

    /// Where the records go, for logs.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Records one decision under `policy`'s settings (sampling, allow-list, subject hashing).
    pub fn record(
        &self,
        policy: &RecordsPolicy,
        door: Door,
        request: &AccessRequest,
        decision: &Decision,
    ) {
        if decision.outcome == Outcome::Allow && policy.allow_sample_ppm < 1_000_000 {
            // Evenly spread: the n-th ALLOW is kept when n × rate crosses a whole million.
            let n = self.seen.fetch_add(1, Relaxed);
            let rate = u64::from(policy.allow_sample_ppm);
            if (n + 1) * rate / 1_000_000 == n * rate / 1_000_000 {
                metrics::global().record_record(RecordEvent::SampledOut);
                return;
            }
        }
        let line = format_record(policy, door, request, decision, SystemTime::now());
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pending.bytes.len() + line.len() > CAPACITY {
            drop(pending);
            metrics::global().record_record(RecordEvent::Dropped);
            return;
        }
        pending.bytes.extend_from_slice(line.as_bytes());
        pending.records += 1;
        let wake = pending.bytes.len() >= WAKE_AT && !pending.woken;
        pending.woken |= wake;
        drop(pending);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

/// What became of a decision's record (for `stepgate_records_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordEvent {
    Written,
    /// The queue was full or the writer gone.
    Dropped,
    /// An ALLOW not kept by `allow_sample`.
    SampledOut,
}

impl RecordEvent {
    pub const ALL: [RecordEvent; 3] = [Self::Written, Self::Dropped, Self::SampledOut];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Dropped => "dropped",
            Self::SampledOut => "sampled_out",
        }
    }
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
    #[serde(skip_serializing_if = "Map::is_empty")]
    attributes: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<TokenFacts<'a>>,
    outcome: &'static str,
    reason: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shadow: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    challenge: Option<Challenge<'a>>,
}

/// What verification established about the token.
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
    /// The raw claims the policy reads (claim requirements, `claim:` headers, CEL).
    #[serde(skip_serializing_if = "Map::is_empty")]
    claims: &'a Map<String, Value>,
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

/// The JSON line of one decision (newline included).
pub fn format_record(
    policy: &RecordsPolicy,
    door: Door,
    request: &AccessRequest,
    decision: &Decision,
    now: SystemTime,
) -> String {
    let http = request.http.as_ref();
    let attributes = policy
        .attributes
        .iter()
        .filter_map(|name| Some((name.clone(), request.attributes.get(name)?.clone())))
        .collect();
    let token = decision.verified.as_deref().map(|t| token_facts(policy, t));
    let record = Record {
        time: super::line::rfc3339(now),
        door: door.as_str(),
        request_id: http.and_then(|h| h.headers.get("x-request-id")),
        method: http.map(|h| h.method.as_str()),
        host: http.map(|h| h.host.as_str()),
        path: http.map(|h| h.target.as_str()),
        operation: request.operation.as_deref(),
        attributes,
        source: request.source.as_ref().map(|s| s.address.as_str()),
        token,
        outcome: decision.outcome.as_str(),
        reason: decision.reason.as_str(),
        status: decision.http_status,
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

fn token_facts<'a>(policy: &RecordsPolicy, t: &'a VerifiedToken) -> TokenFacts<'a> {
    let p = &t.principal;
    let words = |list: &'a [Arc<str>]| list.iter().map(|s| &**s).collect::<Vec<_>>();
    TokenFacts {
        issuer: &p.issuer_id,
        subject: match &policy.subject_key {
            None => p.subject.to_string(),
            Some(key) => keyed_hash(key, &p.subject),
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
        claims: &t.claims,
    }
}

/// `hmac-sha256:` and the first 32 hex digits of HMAC-SHA256(key, subject).
pub fn keyed_hash(key: &[u8], subject: &str) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let tag = aws_lc_rs::hmac::sign(&key, subject.as_bytes());
    let hex: String = tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("hmac-sha256:{hex}")
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
    },
}

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
        })
    }

    /// Writes whole records (`chunk` ends with a newline), rotating first when they would take
    /// the file past its size.
    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self {
            Self::Stdout(out) => out.write_all(chunk).and_then(|()| out.flush()),
            Self::File {
                path,
                file,
                written,
                max_bytes,
                keep,
            } => {
                if *written > 0 && *written + chunk.len() as u64 > *max_bytes {
                    rotate(path, *keep)?;
                    *file = OpenOptions::new().create(true).append(true).open(&*path)?;
                    *written = 0;
                }
                file.write_all(chunk)?;
                *written += chunk.len() as u64;
                Ok(())
            }
        }
    }
}

/// `path` → `path.1`, `path.1` → `path.2`, …, dropping `path.<keep>`.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
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
        let records = {
            let pending = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let (mut pending, _) = shared
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| p.bytes.len() < WAKE_AT)
                .unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut pending.bytes, &mut spare);
            pending.woken = false;
            std::mem::take(&mut pending.records)
        };
        if spare.is_empty() {
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
    }
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
