//! Issuers' key sets over time: discovery, loading at start-up, background refresh, on-demand
//! fetches for an unknown `kid`, and stale-if-error.
//!
//! The failures this module exists to prevent are the common ones of token-verifying proxies: a
//! rotation that rejects every new token until the next scheduled refresh, an unknown-`kid` flood
//! that hammers the identity provider, and an identity-provider blip that becomes an outage. So:
//! - a refresh that fails, or returns no usable key, never replaces a good set; the good set is kept
//!   until `max_stale` has passed since the last success, and only then dropped (fail closed);
//! - an unknown `kid` triggers one shared fetch (single flight) at most once per `cooldown` per
//!   issuer, failures included, and a request waits for it at most `unknown_kid_wait`;
//! - kids found unknown after such a fetch are remembered for a cooldown (negative cache), so a
//!   flood of random kids costs neither fetches nor waits.
//!
//! Requests never wait on this module except for that one bounded wait.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use dashmap::DashMap;
use serde_json::Value;
use tokio::sync::watch;

use super::{
    issuer::{Discovered, Issuer, IssuerName, KeySource, KeyTiming},
    jwks::KeySet,
};
use crate::telemetry::{metrics, traces};

/// Largest JWKS or discovery document accepted (Entra's common key set is about 10 KiB).
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Bound of the negative cache of unknown kids; past it the cache is cleared (a flood of random
/// kids must not grow memory).
const MAX_UNKNOWN_KIDS: usize = 4096;

/// The listener beyond loopback on which key sets holding a bundled demo key are refused, set
/// once when serving starts: keys arriving later (a refresh, an unknown-`kid` fetch, a reload)
/// are held to what the keys at start were.
static DEMO_KEYS_REFUSED: OnceLock<Option<std::net::SocketAddr>> = OnceLock::new();

/// Refuses every key set holding a bundled demo key from now on, naming `address` (the
/// listener beyond loopback it would be served on); `None` leaves them trusted (with a warning).
pub fn refuse_demo_keys(address: Option<std::net::SocketAddr>) {
    let _ = DEMO_KEYS_REFUSED.set(address);
}

/// CAs trusted besides the bundled web roots by the shared client (`--idp-ca`).
static EXTRA_ROOTS: OnceLock<Vec<reqwest::Certificate>> = OnceLock::new();

/// The HTTP client for discovery and key sets: bounded time, few redirects (same origin only),
/// rustls, the bundled web roots and those of `--idp-ca`.
pub fn http_client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let mut builder = client_builder();
            for root in EXTRA_ROOTS.get().into_iter().flatten() {
                builder = builder.add_root_certificate(root.clone());
            }
            builder
                .build()
                .expect("a reqwest client with static settings and parsed roots builds")
        })
        .clone()
}

fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .redirect(same_origin_redirects())
        .user_agent(concat!("stepgate/", env!("CARGO_PKG_VERSION")))
}

/// Up to three redirects, each to the origin (scheme, host, port) of the URL the policy or the
/// discovery document named. A redirect elsewhere is an error: it would fetch keys from a place
/// nobody configured, from an anonymous token's unknown `kid` on demand, and could lead an https
/// URL (and an issuer's `ca_file`) to plain http.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.stop();
        };
        let same = {
            let next = attempt.url();
            next.scheme() == first.scheme()
                && next.host_str() == first.host_str()
                && next.port_or_known_default() == first.port_or_known_default()
        };
        if attempt.previous().len() > 3 {
            attempt.error("more than 3 redirects")
        } else if same {
            attempt.follow()
        } else {
            let to = format!(
                "{}://{}",
                attempt.url().scheme(),
                attempt.url().host_str().unwrap_or("")
            );
            attempt.error(format!(
                "redirected to another origin ({to}), which stepgate does not follow: configure \
                 the URL the keys are served from"
            ))
        }
    })
}

/// The CAs of a PEM bundle; an error says what is wrong (no certificate, a malformed one).
pub fn parse_ca_bundle(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    let roots = reqwest::Certificate::from_pem_bundle(pem)
        .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
    if roots.is_empty() {
        return Err("holds no PEM certificate".to_owned());
    }
    Ok(roots)
}

/// Makes the shared client trust `roots` too. Call before its first use (at start-up); returns
/// false when it is too late.
pub fn trust_extra_roots(roots: Vec<reqwest::Certificate>) -> bool {
    EXTRA_ROOTS.set(roots).is_ok()
}

/// A client that trusts only `roots`, for an issuer with its own `ca_file`.
pub fn client_trusting_only(roots: Vec<reqwest::Certificate>) -> Result<reqwest::Client, String> {
    let mut builder = client_builder().tls_built_in_root_certs(false);
    for root in roots {
        builder = builder.add_root_certificate(root);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

/// Per-issuer coordination of fetches.
#[derive(Debug)]
pub struct FetchControl {
    state: Mutex<FetchState>,
    /// Bumped when an on-demand fetch finishes (whatever its result); waiters watch it.
    finished: watch::Sender<u64>,
    /// Kids looked for and not found after a fetch, with when.
    unknown_kids: DashMap<String, Instant>,
}

#[derive(Debug, Default)]
struct FetchState {
    on_demand_in_flight: bool,
    last_on_demand: Option<Instant>,
    last_success: Option<Instant>,
    consecutive_failures: u32,
    /// The interval the last load suggests for the next scheduled refresh.
    next_refresh: Option<Duration>,
    /// Loads are numbered as they start; `installed` is the number of the load whose key set is
    /// in place. A load finishing after a later-started one installed its set leaves that set:
    /// a slow scheduled fetch must not put back the keys an unknown `kid`'s fetch replaced.
    started: u64,
    installed: u64,
    /// The issuer belongs to a policy being loaded, not served: its key loads are not metrics
    /// yet (a refused reload must not show its loads as the serving issuer's). The last one
    /// waits here until the policy is served ([`FetchControl::serve`]).
    candidate: bool,
    held: Option<(Result<usize, ()>, i64)>,
}

impl Default for FetchControl {
    fn default() -> Self {
        Self {
            state: Mutex::new(FetchState::default()),
            finished: watch::Sender::new(0),
            unknown_kids: DashMap::new(),
        }
    }
}

impl FetchControl {
    fn state(&self) -> std::sync::MutexGuard<'_, FetchState> {
        // A panic while holding this lock cannot leave the state inconsistent: recover it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the keys in place were loaded less than `within` ago.
    pub fn loaded_within(&self, within: Duration) -> bool {
        self.state()
            .last_success
            .is_some_and(|at| at.elapsed() < within)
    }

    /// Holds this issuer's key-load metrics until [`Self::serve`]: its policy is a candidate.
    pub fn hold_metrics(&self) {
        self.state().candidate = true;
    }

    /// The issuer's policy is served: its last key load (held since [`Self::hold_metrics`])
    /// becomes the metric of `issuer_id`, and later loads are recorded as they come.
    pub fn serve(&self, issuer_id: &str) {
        let held = {
            let mut state = self.state();
            state.candidate = false;
            state.held.take()
        };
        if let Some((result, at)) = held {
            metrics::global().record_key_load(issuer_id, result, at);
        }
    }

    /// Takes over the history of the same issuer in the policy being replaced (when the last
    /// success was, the failures since, when to refresh next), along with its keys: without it a
    /// reload during an identity-provider outage would make the carried-over keys look never
    /// loaded, and the first failed retry would drop them as stale.
    pub(crate) fn inherit(&self, previous: &FetchControl) {
        let previous = previous.state();
        let mut state = self.state();
        state.last_success = previous.last_success;
        state.consecutive_failures = previous.consecutive_failures;
        state.next_refresh = previous.next_refresh;
        state.last_on_demand = previous.last_on_demand;
    }
}

/// Marks an issuer's on-demand fetch as running; whatever ends it (success, failure, a panic, the
/// task dropped at shutdown), dropping the mark frees the issuer for the next one and wakes the
/// requests waiting for it.
struct OnDemandFetch(Arc<Issuer>);

impl Drop for OnDemandFetch {
    fn drop(&mut self) {
        self.0.fetch.state().on_demand_in_flight = false;
        self.0.fetch.finished.send_modify(|n| *n += 1);
    }
}

/// A successful load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub keys: usize,
    /// `Cache-Control: max-age` of the key-set response.
    pub max_age: Option<Duration>,
}

/// Reads the issuer's key set from its source (running discovery first when configured) and
/// installs it. A failure or an empty set leaves the current keys in place.
pub async fn load(issuer: &Issuer, http: &reqwest::Client) -> Result<Loaded, String> {
    let span = key_load_span(issuer, "scheduled");
    let result = load_inner(issuer, http, true).await;
    record(issuer, &result, span);
    result
}

fn key_load_span(issuer: &Issuer, why: &'static str) -> traces::WorkSpan {
    traces::start_work(
        "stepgate key load",
        vec![
            opentelemetry::KeyValue::new("stepgate.issuer_id", issuer.id.to_string()),
            opentelemetry::KeyValue::new("stepgate.trigger", why),
        ],
    )
}

fn record(issuer: &Issuer, result: &Result<Loaded, String>, mut span: traces::WorkSpan) {
    if let Err(err) = result {
        span.failed(err);
    }
    drop(span);
    let now = crate::server::authorizer::unix_now();
    let outcome = result.as_ref().map(|l| l.keys).map_err(|_| ());
    let mut state = issuer.fetch.state();
    if state.candidate {
        state.held = Some((outcome, now));
    } else {
        metrics::global().record_key_load(&issuer.id, outcome, now);
    }
    match result {
        Ok(_) => {
            state.last_success = Some(Instant::now());
            state.consecutive_failures = 0;
        }
        Err(_) => state.consecutive_failures = state.consecutive_failures.saturating_add(1),
    }
    state.next_refresh = Some(next_refresh(
        &issuer.timing,
        state.consecutive_failures,
        result,
    ));
}

/// How long a `jwks_file` read may take, as long as a key-set fetch.
const FILE_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most reads of one key file at a time: each holds a blocking thread while it runs, and a
/// read stuck on a stalled file system holds it until the read returns.
const MAX_FILE_READS: u32 = 8;

/// A permit to read a key file: at most [`MAX_FILE_READS`] of one path at a time. A caller waits
/// for a permit as long as for a read ([`FILE_READ_TIMEOUT`]); issuers sharing a file read it
/// side by side, and while eight reads of it are stuck, the loads after them fail without
/// holding another thread. Released when the read returns, on its blocking thread, however long
/// after its caller stopped waiting.
async fn file_read_permit(
    path: &std::path::Path,
    timeout: Duration,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    static READS: Mutex<Vec<(std::path::PathBuf, Arc<tokio::sync::Semaphore>)>> =
        Mutex::new(Vec::new());
    let semaphore = {
        let mut reads = READS.lock().unwrap_or_else(|e| e.into_inner());
        // Paths nobody reads or waits for are forgotten (a policy's issuers change with
        // reloads); a permit, and a caller waiting for one, hold the semaphore.
        reads.retain(|(_, s)| Arc::strong_count(s) > 1);
        match reads.iter().find(|(p, _)| p == path) {
            Some((_, semaphore)) => Arc::clone(semaphore),
            None => {
                let semaphore = Arc::new(tokio::sync::Semaphore::new(MAX_FILE_READS as usize));
                reads.push((path.to_owned(), Arc::clone(&semaphore)));
                semaphore
            }
        }
    };
    tokio::time::timeout(timeout, semaphore.acquire_owned())
        .await
        .ok()?
        .ok()
}

/// Runs `read` on a blocking thread, for at most `timeout`. A read that stalls (a hung network
/// file system) holds its thread, not the caller: the load fails, and the reload or refresh
/// waiting for it goes on.
async fn read_blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    timeout: Duration,
    read: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, String> {
    tokio::time::timeout(timeout, tokio::task::spawn_blocking(read))
        .await
        .map_err(|_| format!("no answer in {timeout:?}"))?
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

async fn load_inner(
    issuer: &Issuer,
    http: &reqwest::Client,
    discover: bool,
) -> Result<Loaded, String> {
    let ticket = {
        let mut state = issuer.fetch.state();
        state.started += 1;
        state.started
    };
    let http = issuer.http.as_ref().unwrap_or(http);
    let (bytes, max_age) = match &issuer.key_source {
        KeySource::File(path) => {
            // As the policy file is read: a regular file only (a FIFO in its place would hold the
            // read for ever), off the serving threads, and no larger than a fetched key set.
            let cannot = |e: &str| format!("cannot read {}: {e}", path.display());
            let reading = file_read_permit(path, FILE_READ_TIMEOUT)
                .await
                .ok_or_else(|| {
                    cannot(
                        "the reads of it started earlier have not returned (a stalled file \
                         system?)",
                    )
                })?;
            let owned = path.clone();
            let bytes = read_blocking(FILE_READ_TIMEOUT, move || {
                let _reading = reading;
                crate::config::read_file_at_most(&owned, MAX_JWKS_FILE_BYTES)
            })
            .await
            .map_err(|e| cannot(&e))?;
            (bytes, None)
        }
        KeySource::Uri(uri) => fetch(http, uri).await?,
        KeySource::Discovery(url) => {
            let known = issuer.discovered();
            let discovered = match known {
                Some(d) if !discover => d,
                known => match discover_issuer(issuer, http, url).await {
                    Ok(d) => {
                        issuer.set_discovered(d.clone());
                        Arc::new(d)
                    }
                    // The discovery document being down says nothing about the keys: keep using
                    // the jwks_uri it named last time.
                    Err(err) => match known {
                        Some(d) => {
                            tracing::warn!(
                                issuer = %issuer.id,
                                error = %err,
                                jwks_uri = %crate::telemetry::url_shown(&d.jwks_uri),
                                "discovery failed; using the jwks_uri it named before"
                            );
                            d
                        }
                        None => return Err(err),
                    },
                },
            };
            fetch(http, &discovered.jwks_uri).await?
        }
    };
    let (set, notes) = KeySet::parse(&bytes).map_err(|e| format!("unusable key set: {e}"))?;
    for note in notes {
        tracing::warn!(issuer = %issuer.id, "{note}");
    }
    if set.is_empty() {
        return Err("the key set holds no usable signing key".to_owned());
    }
    if set.has_demo_key() {
        if let Some(address) = DEMO_KEYS_REFUSED.get().copied().flatten() {
            return Err(format!(
                "the key set holds a demo key (examples/demo-keys), whose private key is \
                 published; it is not trusted while serving on {address} without \
                 --allow-demo-keys"
            ));
        }
        tracing::warn!(
            issuer = %issuer.id,
            "DEMO KEY IN USE: issuer {:?} trusts the demo signing key shipped with stepgate; \
             anyone can mint tokens for it. Never use this configuration in production.",
            issuer.id
        );
    }
    let keys = set.len();
    let mut state = issuer.fetch.state();
    if ticket > state.installed {
        state.installed = ticket;
        issuer.set_keys(set);
    } else {
        tracing::debug!(
            issuer = %issuer.id,
            "a key set fetched since this one started is in place; keeping it"
        );
    }
    Ok(Loaded { keys, max_age })
}

/// Reads `issuer` and `jwks_uri` from an OIDC discovery document and checks them against the
/// policy.
async fn discover_issuer(
    issuer: &Issuer,
    http: &reqwest::Client,
    url: &str,
) -> Result<Discovered, String> {
    let (bytes, _) = fetch(http, url).await?;
    // Messages name the URL masked; it is compared as fetched.
    let fetched = url;
    let url = &crate::telemetry::url_shown(url);
    let doc: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{url}: not valid JSON: {e}"))?;
    let field = |name: &str| {
        doc.get(name)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("{url}: the discovery document has no {name:?}"))
    };
    let (discovered_issuer, jwks_uri) = (field("issuer")?, field("jwks_uri")?);
    if matches!(issuer.name, IssuerName::Discovered) {
        learned_issuer(fetched, &discovered_issuer)?;
    } else if discovered_issuer != issuer.issuer {
        return Err(format!(
            "{url}: the discovery document names issuer {discovered_issuer:?}, the policy {:?}",
            issuer.issuer
        ));
    }
    let shown = crate::telemetry::url_shown(&jwks_uri);
    let parsed =
        reqwest::Url::parse(&jwks_uri).map_err(|e| format!("{url}: jwks_uri {shown:?}: {e}"))?;
    let loopback = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
        return Err(format!("{url}: jwks_uri {shown:?} is not https"));
    }
    Ok(Discovered {
        name: IssuerName::parse(&discovered_issuer),
        issuer: discovered_issuer,
        jwks_uri,
    })
}

/// Whether an issuer the policy leaves to discovery may be taken from the document at `url`.
/// OpenID Connect Discovery 1.0 §4.3: the document's `issuer` must be the one whose
/// `/.well-known/openid-configuration` it was fetched from; otherwise a provider could name
/// another's issuer and be trusted for its tokens. A `{tenantid}` issuer (Entra's `common` and
/// `organizations` documents) would accept every tenant's tokens: the policy must state it with
/// `tenants` or `any_tenant`.
fn learned_issuer(fetched: &str, discovered: &str) -> Result<(), String> {
    let url = crate::telemetry::url_shown(fetched);
    if discovered.contains(IssuerName::TENANT_PLACEHOLDER) {
        return Err(format!(
            "{url}: the discovery document names the multi-tenant issuer {discovered:?}, which \
             would accept tokens of every tenant; state it in the policy as `issuer:` with \
             `tenants` (or `any_tenant: true`)"
        ));
    }
    // Compared as URLs: the host in any case and an explicit default port name the same place.
    let same = match (
        reqwest::Url::parse(&discovery_url_of(discovered)),
        reqwest::Url::parse(fetched),
    ) {
        (Ok(own), Ok(fetched)) => own == fetched,
        _ => false,
    };
    if !same {
        return Err(format!(
            "{url}: the discovery document names issuer {discovered:?}, whose own document is \
             at {:?} (OpenID Connect Discovery 4.3); if this identity provider names its issuer \
             so, state `issuer: {discovered}` in the policy",
            discovery_url_of(discovered)
        ));
    }
    Ok(())
}

/// Where an issuer's discovery document is: its identifier without a trailing `/`, then
/// `/.well-known/openid-configuration` (OpenID Connect Discovery 1.0 §4).
pub fn discovery_url_of(issuer: &str) -> String {
    format!("{}{DISCOVERY_SUFFIX}", issuer.trim_end_matches('/'))
}

/// The issuer whose discovery document is at `url`, if `url` has the form
/// [`discovery_url_of`] gives (its own `/` at the end may have been dropped).
pub fn issuer_of_discovery_url(url: &str) -> Option<&str> {
    url.strip_suffix(DISCOVERY_SUFFIX)
}

/// The path OpenID Connect Discovery appends to an issuer.
/// The largest `jwks_file` read, as a fetched key set.
pub const MAX_JWKS_FILE_BYTES: u64 = MAX_DOCUMENT_BYTES as u64;

pub const DISCOVERY_SUFFIX: &str = "/.well-known/openid-configuration";

/// GET with a size limit; returns the body and the response's `Cache-Control: max-age`.
async fn fetch(http: &reqwest::Client, url: &str) -> Result<(Vec<u8>, Option<Duration>), String> {
    // Errors name the URL with its credentials masked, reqwest's own without it.
    let uri = crate::telemetry::url_shown(url);
    let failed = |e: reqwest::Error| {
        format!(
            "GET {uri}: {}",
            crate::telemetry::with_causes(&e.without_url())
        )
    };
    let mut response = http
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(failed)?;
    if !response.status().is_success() {
        return Err(format!("GET {uri}: HTTP {}", response.status()));
    }
    let max_age = response
        .headers()
        .get_all("cache-control")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(max_age);
    if response
        .content_length()
        .is_some_and(|len| len > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(format!("GET {uri}: larger than {MAX_DOCUMENT_BYTES} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!("GET {uri}: larger than {MAX_DOCUMENT_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, max_age))
}

/// `max-age=N` from a `Cache-Control` value (`no-store`/`no-cache` count as 0).
fn max_age(value: &str) -> Option<Duration> {
    value.split(',').map(str::trim).find_map(|directive| {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        let seconds = lower.strip_prefix("max-age=")?.trim_matches('"');
        seconds.parse::<u64>().ok().map(Duration::from_secs)
    })
}

/// How long to wait before the next scheduled refresh: the response's `max-age` within bounds,
/// or `refresh`; after failures, `retry` doubling per failure up to `refresh`. After a success,
/// never more than half of `max_stale`: a set refreshed only as often as it may be kept stale
/// (a daily `max-age` against the default day of `max_stale`) would be dropped by the first
/// refresh that fails, without one retry.
fn next_refresh(timing: &KeyTiming, failures: u32, result: &Result<Loaded, String>) -> Duration {
    let half_stale = timing.max_stale / 2;
    match result {
        Ok(Loaded {
            max_age: Some(age), ..
        }) => (*age)
            .clamp(timing.min_refresh, timing.max_refresh)
            .min(half_stale),
        Ok(_) => timing.refresh.min(half_stale),
        Err(_) => timing
            .retry
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(timing.refresh),
    }
}

/// Loads every issuer's keys once, all issuers at the same time, logging each result. Returns the
/// ids of issuers left without keys.
pub async fn load_all(issuers: &[Arc<Issuer>], http: &reqwest::Client) -> Vec<String> {
    let mut loads = tokio::task::JoinSet::new();
    for issuer in issuers {
        let (issuer, http) = (Arc::clone(issuer), http.clone());
        loads.spawn(async move {
            let result = load(&issuer, &http).await;
            log_load(&issuer, &result);
            issuer
        });
    }
    let mut without_keys = Vec::new();
    while let Some(joined) = loads.join_next().await {
        if let Ok(issuer) = joined
            && issuer.keys().is_empty()
        {
            without_keys.push(issuer.id.to_string());
        }
    }
    without_keys.sort();
    without_keys
}

fn log_load(issuer: &Issuer, result: &Result<Loaded, String>) {
    match result {
        Ok(loaded) => tracing::info!(
            issuer = %issuer.id,
            keys = loaded.keys,
            max_age = ?loaded.max_age,
            "loaded signing keys"
        ),
        Err(err) => tracing::error!(
            issuer = %issuer.id,
            error = %err,
            kept = issuer.keys().len(),
            "could not load signing keys; keeping the last good key set"
        ),
    }
}

/// Refreshes each issuer's keys until `stop` changes: on the interval the responses' `max-age`
/// suggests (bounded), sooner with backoff after a failure, and drops a key set that could not be
/// refreshed for `max_stale` as soon as that has passed, not at the next attempt (which backoff
/// may put an hour later). One task per issuer.
pub fn spawn_refresh(
    issuers: Vec<Arc<Issuer>>,
    http: reqwest::Client,
    stop: watch::Receiver<bool>,
) {
    for issuer in issuers {
        let http = http.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut next_attempt = after(refresh_wait(&issuer));
            loop {
                let wake = stale_at(&issuer).map_or(next_attempt, |at| at.min(next_attempt));
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = stop.changed() => return,
                }
                if Instant::now() >= next_attempt {
                    // A load that hangs (up to a fetch's timeout, twice with discovery) does not
                    // hold the keys past `max_stale`: they are dropped when it passes, and the
                    // load goes on.
                    let loading = load(&issuer, &http);
                    tokio::pin!(loading);
                    let result = loop {
                        let stale = stale_at(&issuer);
                        let until_stale = async move {
                            match stale {
                                Some(at) => tokio::time::sleep_until(at.into()).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            result = &mut loading => break result,
                            () = until_stale => expire_stale(&issuer),
                            _ = stop.changed() => return,
                        }
                    };
                    log_load(&issuer, &result);
                    next_attempt = after(refresh_wait(&issuer));
                }
                expire_stale(&issuer);
            }
        });
    }
}

/// The wait before the next scheduled load, as the last load (scheduled or on demand) set it.
fn refresh_wait(issuer: &Issuer) -> Duration {
    issuer
        .fetch
        .state()
        .next_refresh
        .unwrap_or(issuer.timing.retry)
}

/// When the keys in place become too stale to trust, if they can: remote keys only, once loaded.
/// A millisecond after `max_stale`, so that [`expire_stale`] finds them past it.
fn stale_at(issuer: &Issuer) -> Option<Instant> {
    if !issuer.key_source.is_remote() || issuer.keys().is_empty() {
        return None;
    }
    let last_success = issuer.fetch.state().last_success?;
    last_success.checked_add(
        issuer
            .timing
            .max_stale
            .saturating_add(Duration::from_millis(1)),
    )
}

/// `wait` from now; a wait too long for the clock (a policy may say `max_refresh: 10000000d`) is
/// as good as never.
fn after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(1 << 30))
}

/// Drops the key set once the last successful load is older than `max_stale`: trusting keys an
/// identity provider may long have revoked is worse than refusing tokens.
fn expire_stale(issuer: &Issuer) {
    let last_success = issuer.fetch.state().last_success;
    let stale = last_success.is_none_or(|at| at.elapsed() > issuer.timing.max_stale);
    if stale && !issuer.keys().is_empty() && issuer.key_source.is_remote() {
        tracing::error!(
            issuer = %issuer.id,
            max_stale = ?issuer.timing.max_stale,
            "signing keys could not be refreshed for longer than max_stale; dropping them"
        );
        issuer.set_keys(KeySet::default());
    }
}

/// What an unknown-`kid` request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownKid {
    /// The keys now hold the kid: decide again.
    Found,
    /// Not there (after a fetch, during the cooldown, or remembered as unknown).
    Absent,
    /// The fetch did not finish within `unknown_kid_wait`.
    TimedOut,
}

impl UnknownKid {
    fn label(self) -> &'static str {
        match self {
            Self::Found => "found",
            Self::Absent => "absent",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Handles a token whose `kid` the issuer's keys lack: starts (or joins) the one shared fetch, at
/// most once per cooldown, and waits for it at most `unknown_kid_wait`.
pub async fn resolve_unknown_kid(issuer: &Arc<Issuer>, kid: &str) -> UnknownKid {
    let outcome = resolve(issuer, kid).await;
    metrics::global().record_unknown_kid(&issuer.id, outcome.label());
    outcome
}

async fn resolve(issuer: &Arc<Issuer>, kid: &str) -> UnknownKid {
    if !issuer.key_source.is_remote() {
        return UnknownKid::Absent;
    }
    // The key may have arrived between the request's decision and now.
    let present = || issuer.keys().find(Some(kid)).is_some();
    if present() {
        return UnknownKid::Found;
    }
    let control = &issuer.fetch;
    let cooldown = issuer.timing.unknown_kid_cooldown;
    if control
        .unknown_kids
        .get(kid)
        .is_some_and(|seen| seen.elapsed() < cooldown)
    {
        return UnknownKid::Absent;
    }
    let mut finished = control.finished.subscribe();
    let start = {
        let mut state = control.state();
        if state.on_demand_in_flight {
            false
        } else if state
            .last_on_demand
            .is_some_and(|at| at.elapsed() < cooldown)
        {
            drop(state);
            // A fetch may have finished just now, with this key.
            if present() {
                return UnknownKid::Found;
            }
            remember_unknown(control, kid);
            return UnknownKid::Absent;
        } else {
            state.on_demand_in_flight = true;
            state.last_on_demand = Some(Instant::now());
            true
        }
    };
    if start {
        // The fetch runs in its own task: a request that stops waiting must not cancel it.
        let in_flight = OnDemandFetch(Arc::clone(issuer));
        tokio::spawn(async move {
            let issuer = &in_flight.0;
            let span = key_load_span(issuer, "unknown_kid");
            let result = load_inner(issuer, &http_client(), false).await;
            record(issuer, &result, span);
            match &result {
                Ok(loaded) => {
                    tracing::info!(issuer = %issuer.id, keys = loaded.keys, "fetched signing keys for an unknown kid")
                }
                Err(err) => {
                    tracing::warn!(issuer = %issuer.id, error = %err, "fetch for an unknown kid failed; keeping the last good key set")
                }
            }
            drop(in_flight);
        });
    }
    match tokio::time::timeout(issuer.timing.unknown_kid_wait, finished.changed()).await {
        Err(_) => UnknownKid::TimedOut,
        Ok(_) if present() => UnknownKid::Found,
        Ok(_) => {
            remember_unknown(control, kid);
            UnknownKid::Absent
        }
    }
}

fn remember_unknown(control: &FetchControl, kid: &str) {
    if control.unknown_kids.len() >= MAX_UNKNOWN_KIDS {
        control.unknown_kids.clear();
    }
    control.unknown_kids.insert(kid.to_owned(), Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issuers sharing a key file read it side by side, up to a bound; past it a load waits
    /// for a permit as long as for a read, then fails without holding a thread; a permit given
    /// back is taken by the next.
    #[tokio::test]
    async fn key_file_reads_are_bounded_per_file() {
        let path = std::path::Path::new("/stepgate-test/keys.json");
        let wait = Duration::from_millis(50);
        let mut held = Vec::new();
        for _ in 0..MAX_FILE_READS {
            held.push(file_read_permit(path, wait).await.expect("side by side"));
        }
        assert!(
            file_read_permit(path, wait).await.is_none(),
            "past the bound"
        );
        let other = std::path::Path::new("/stepgate-test/other.json");
        assert!(file_read_permit(other, wait).await.is_some());
        held.pop();
        assert!(file_read_permit(path, wait).await.is_some());
    }

    /// A key file whose read stalls (a hung file system) fails the load after the timeout,
    /// instead of holding the reload waiting for it for ever; a read that answers is returned.
    #[tokio::test]
    async fn a_stalled_read_fails_after_its_timeout() {
        let started = std::time::Instant::now();
        let stalled = read_blocking(Duration::from_millis(100), || {
            std::thread::sleep(Duration::from_secs(3));
            Ok::<_, std::io::Error>(Vec::<u8>::new())
        })
        .await;
        assert_eq!(stalled, Err("no answer in 100ms".to_owned()));
        assert!(started.elapsed() < Duration::from_secs(2));
        let read = read_blocking(Duration::from_secs(5), || {
            Ok::<_, std::io::Error>(vec![1u8])
        });
        assert_eq!(read.await, Ok(vec![1]));
        let failed = read_blocking(Duration::from_secs(5), || {
            Err::<Vec<u8>, _>(std::io::Error::other("gone"))
        });
        assert_eq!(failed.await, Err("gone".to_owned()));
    }

    #[test]
    fn an_issuer_is_learned_only_from_its_own_discovery_url() {
        let own = "https://login.example/realms/acme/.well-known/openid-configuration";
        for (url, issuer) in [
            (own, "https://login.example/realms/acme"),
            (own, "https://login.example/realms/acme/"),
            (
                "https://LOGIN.example:443/realms/acme/.well-known/openid-configuration",
                "https://login.example/realms/acme",
            ),
            (
                "https://tenant.auth0.example/.well-known/openid-configuration",
                "https://tenant.auth0.example/",
            ),
            // An `@` in the path is the path's (the URL shown in messages is not compared).
            (
                "https://login.example/t/@acme/.well-known/openid-configuration",
                "https://login.example/t/@acme",
            ),
        ] {
            assert_eq!(learned_issuer(url, issuer), Ok(()), "{url} naming {issuer}");
        }
        for (url, issuer, says) in [
            (own, "https://login.example/realms/other", "4.3"),
            (own, "https://partner.example/realms/acme", "4.3"),
            (
                "https://login.example/common/v2.0/.well-known/openid-configuration",
                "https://login.example/{tenantid}/v2.0",
                "multi-tenant",
            ),
        ] {
            let refused = learned_issuer(url, issuer).expect_err(issuer);
            assert!(
                refused.contains(says) && refused.contains(issuer),
                "{refused}"
            );
        }
    }

    #[test]
    fn next_refresh_follows_max_age_within_bounds_and_backs_off_after_failures() {
        let t = KeyTiming::default();
        let ok = |age: Option<u64>| -> Result<Loaded, String> {
            Ok(Loaded {
                keys: 1,
                max_age: age.map(Duration::from_secs),
            })
        };
        assert_eq!(
            next_refresh(&t, 0, &ok(Some(7200))),
            Duration::from_secs(7200)
        );
        assert_eq!(next_refresh(&t, 0, &ok(Some(5))), t.min_refresh);
        // A day's `max-age` against a day of `max_stale`: refreshed twice as often, so that a
        // failed refresh leaves half a day of retries before the keys are dropped.
        assert_eq!(t.max_refresh, t.max_stale);
        assert_eq!(next_refresh(&t, 0, &ok(Some(10_000_000))), t.max_stale / 2);
        assert_eq!(next_refresh(&t, 0, &ok(Some(86_400))), t.max_stale / 2);
        let long_stale = KeyTiming {
            max_stale: Duration::from_secs(7 * 86_400),
            ..KeyTiming::default()
        };
        assert_eq!(
            next_refresh(&long_stale, 0, &ok(Some(10_000_000))),
            t.max_refresh
        );
        assert_eq!(next_refresh(&t, 0, &ok(None)), t.refresh);
        let failed = Err("down".to_owned());
        assert_eq!(next_refresh(&t, 1, &failed), t.retry);
        assert_eq!(next_refresh(&t, 3, &failed), t.retry * 4);
        assert_eq!(next_refresh(&t, 30, &failed), t.refresh);
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_that_is_a_fifo_or_too_large_is_refused_unread() {
        let dir = std::env::temp_dir().join(format!("stepgate-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("jwks.fifo");
        let _ = std::fs::remove_file(&fifo);
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let large = dir.join("large.json");
        std::fs::write(&large, vec![b' '; MAX_DOCUMENT_BYTES + 1]).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (file, why) in [(fifo, "not a regular file"), (large, "larger than")] {
            let issuer = issuer_with(KeySource::File(file.clone()), KeyTiming::default());
            let loaded = runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), load(&issuer, &http_client())).await
            });
            let error = loaded
                .expect("refused without waiting for a writer")
                .unwrap_err();
            assert!(error.contains(why), "{}: {error}", file.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn remote_issuer(uri: String, timing: KeyTiming) -> Arc<Issuer> {
        issuer_with(KeySource::Uri(uri), timing)
    }

    fn issuer_with(key_source: KeySource, timing: KeyTiming) -> Arc<Issuer> {
        use super::super::issuer::{ChallengeStyle, EntraChallenge, IssuerSettings, Tenants};
        Arc::new(Issuer::new(IssuerSettings {
            id: "remote".into(),
            issuer: "https://idp.example".into(),
            tenants: Tenants::NotApplicable,
            audiences: vec!["api".into()],
            admin_audiences: Vec::new(),
            algorithms: vec![jsonwebtoken::Algorithm::RS256],
            leeway: 60,
            refuse_id_tokens: true,
            require_at_jwt: false,
            accept_bound_tokens: false,
            subject_claim: crate::identity::issuer::SubjectClaim::Sub,
            challenge: ChallengeStyle::Rfc9470,
            entra: EntraChallenge {
                authorization_uri: String::new(),
                realm: String::new(),
                client_id: None,
            },
            key_source,
            timing,
            http: None,
            trust: None,
        }))
    }

    /// A key set's URL may carry a credential (user information, an `api_key` parameter): a
    /// failed fetch's error, which is logged and set on the key load's span, masks it, and
    /// reqwest's own message (which repeats the URL) is taken without the URL.
    #[test]
    fn a_failed_fetch_names_its_url_without_credentials() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("http://svc:Sup3rSecret@127.0.0.1:{port}/keys?api_key=K3Y&v=2");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = reqwest::Client::new();
        let error = runtime.block_on(fetch(&http, &url)).unwrap_err();
        assert!(
            error.starts_with(&format!(
                "GET http://***@127.0.0.1:{port}/keys?api_key=***&v=***: "
            )),
            "{error}"
        );
        assert!(
            !error.contains("Sup3rSecret") && !error.contains("K3Y"),
            "{error}"
        );
    }

    #[test]
    fn an_on_demand_fetch_cut_short_still_frees_the_issuer_for_the_next_one() {
        // A listener that never accepts: the fetch connects and then waits for an answer.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("http://{}/keys", silent.local_addr().unwrap());
        let issuer = remote_issuer(
            uri,
            KeyTiming {
                unknown_kid_cooldown: Duration::ZERO,
                unknown_kid_wait: Duration::from_millis(50),
                ..KeyTiming::default()
            },
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let outcome = runtime.block_on(resolve_unknown_kid(&issuer, "new-kid"));
        assert_eq!(outcome, UnknownKid::TimedOut);
        assert!(issuer.fetch.state().on_demand_in_flight, "still fetching");
        // Shutting the runtime down drops the fetch's task mid-flight.
        drop(runtime);
        assert!(
            !issuer.fetch.state().on_demand_in_flight,
            "the issuer would never fetch on demand again"
        );
    }

    /// The demo key set with every `kid` prefixed, as a JSON document.
    fn demo_keys(prefix: &str) -> String {
        let demo = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/demo-keys/jwks.json"
        ))
        .unwrap();
        demo.replace("\"stepgate-demo-", &format!("\"{prefix}"))
    }

    /// Answers one HTTP request on `stream` with `body`, then closes it.
    async fn answer(mut stream: tokio::net::TcpStream, body: &str) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before its request ended");
            request.extend_from_slice(&buf[..n]);
        }
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_slow_scheduled_fetch_does_not_put_back_the_keys_an_unknown_kid_fetched() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = remote_issuer(
            format!("http://{}/keys", listener.local_addr().unwrap()),
            KeyTiming {
                unknown_kid_cooldown: Duration::ZERO,
                unknown_kid_wait: Duration::from_secs(5),
                ..KeyTiming::default()
            },
        );
        // The scheduled refresh starts first and its answer (the set before the rotation) is
        // held until the unknown kid's fetch has installed the rotated set.
        let http = http_client();
        let scheduled = tokio::spawn({
            let (issuer, http) = (Arc::clone(&issuer), http.clone());
            async move { load(&issuer, &http).await }
        });
        let (slow, _) = listener.accept().await.unwrap();
        let on_demand = tokio::spawn({
            let issuer = Arc::clone(&issuer);
            async move { resolve_unknown_kid(&issuer, "rotated-rsa-1").await }
        });
        let (fast, _) = listener.accept().await.unwrap();
        answer(fast, &demo_keys("rotated-")).await;
        assert_eq!(on_demand.await.unwrap(), UnknownKid::Found);
        answer(slow, &demo_keys("before-")).await;
        assert!(scheduled.await.unwrap().is_ok());
        let keys = issuer.keys();
        assert!(
            keys.find(Some("rotated-rsa-1")).is_some(),
            "the slow refresh put back the set from before the rotation"
        );
        assert!(keys.find(Some("before-rsa-1")).is_none());
    }

    #[tokio::test]
    async fn keys_are_dropped_once_max_stale_has_passed_not_at_the_next_attempt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let issuer = remote_issuer(
            format!("http://{address}/keys"),
            KeyTiming {
                // After the first failure the next attempt is an hour away.
                retry: Duration::from_secs(3600),
                refresh: Duration::from_secs(3600),
                max_stale: Duration::from_millis(600),
                ..KeyTiming::default()
            },
        );
        let http = http_client();
        let first = tokio::spawn({
            let (issuer, http) = (Arc::clone(&issuer), http.clone());
            async move { load(&issuer, &http).await }
        });
        let (stream, _) = listener.accept().await.unwrap();
        answer(stream, &demo_keys("k-")).await;
        assert!(first.await.unwrap().is_ok());
        let loaded = Instant::now();
        // The identity provider goes away: the refresh at half of max_stale fails.
        drop(listener);
        let (stop_tx, stop) = watch::channel(false);
        spawn_refresh(vec![Arc::clone(&issuer)], http, stop);
        let deadline = loaded + Duration::from_secs(10);
        while !issuer.keys().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the keys were still trusted {:?} after their last load, max_stale being 600 ms",
                loaded.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            loaded.elapsed() >= Duration::from_millis(600),
            "dropped early"
        );
        assert!(issuer.fetch.state().consecutive_failures >= 1);
        let _ = stop_tx.send(true);
    }

    #[test]
    fn a_reloaded_issuer_inherits_when_its_keys_last_loaded() {
        let timing = KeyTiming::default();
        let old = remote_issuer("https://idp.example/keys".into(), timing.clone());
        let loaded_at = Instant::now() - Duration::from_secs(60);
        {
            let mut state = old.fetch.state();
            state.last_success = Some(loaded_at);
            state.consecutive_failures = 3;
            state.next_refresh = Some(Duration::from_secs(4));
        }
        let fresh = remote_issuer("https://idp.example/keys".into(), timing);
        fresh.fetch.inherit(&old.fetch);
        let state = fresh.fetch.state();
        assert_eq!(state.last_success, Some(loaded_at));
        assert_eq!(state.consecutive_failures, 3);
        assert_eq!(state.next_refresh, Some(Duration::from_secs(4)));
    }

    #[test]
    fn reads_max_age_from_cache_control() {
        assert_eq!(
            max_age("public, max-age=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            max_age("max-age=\"60\", must-revalidate"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
