//! Prometheus metrics: decisions by door, outcome and reason; decision latency; key loads per
//! issuer; policy reloads. Served as text on `--metrics-listen` (`GET /metrics`).
//!
//! Counters live in one process-wide registry of atomics, and the label sets are bounded (reasons
//! are a closed enum, issuers come from the policy). The per-request counters (decisions, token
//! cache events) are fixed arrays indexed by their enums: one atomic add, no hashing and no lock.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        OnceLock,
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use dashmap::DashMap;

use crate::{
    decision::{Outcome, Reason},
    request::Door,
};

const DOORS: [Door; 3] = [Door::Check, Door::Decide, Door::Offline];
const OUTCOMES: [Outcome; 3] = [Outcome::Allow, Outcome::StepUp, Outcome::Deny];

/// A verified-token cache event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheEvent {
    Hit,
    Miss,
    /// Removed before its time: the cache was full, or its signing key left the issuer's key set.
    Evicted,
}

impl CacheEvent {
    const ALL: [CacheEvent; 3] = [Self::Evicted, Self::Hit, Self::Miss];

    fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Evicted => "evicted",
        }
    }
}

/// Where the counter of (door, outcome, reason) sits in [`Metrics::decisions`].
fn decision_slot(door: Door, outcome: Outcome, reason: Reason) -> usize {
    ((door as usize * OUTCOMES.len()) + outcome as usize) * Reason::ALL.len() + reason as usize
}

/// Upper bounds of the latency histogram, in microseconds.
const LATENCY_BOUNDS_MICROS: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

pub struct Metrics {
    /// One counter per (door, outcome, reason), at [`decision_slot`].
    decisions: Box<[AtomicU64]>,
    latency_buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    key_loads: DashMap<(String, &'static str), AtomicU64>,
    keys: DashMap<String, IssuerKeys>,
    reloads: DashMap<&'static str, AtomicU64>,
    unknown_kids: DashMap<(String, &'static str), AtomicU64>,
    /// One counter per [`CacheEvent`], by discriminant.
    token_cache: [AtomicU64; CacheEvent::ALL.len()],
    grpc_connections: AtomicI64,
    accept_errors: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let slots = DOORS.len() * OUTCOMES.len() * Reason::ALL.len();
        Self {
            decisions: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::new(0),
            latency_sum_micros: AtomicU64::new(0),
            key_loads: DashMap::new(),
            keys: DashMap::new(),
            reloads: DashMap::new(),
            unknown_kids: DashMap::new(),
            token_cache: Default::default(),
            grpc_connections: AtomicI64::new(0),
            accept_errors: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct IssuerKeys {
    count: AtomicU64,
    last_success_unix: AtomicI64,
}

/// The process-wide registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

impl Metrics {
    pub fn record_decision(&self, door: Door, outcome: Outcome, reason: Reason, elapsed: Duration) {
        self.decisions[decision_slot(door, outcome, reason)].fetch_add(1, Relaxed);
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        // One bucket per decision (the smallest bound that holds it); `/metrics` renders the
        // cumulative counts Prometheus expects.
        if let Some(bucket) = LATENCY_BOUNDS_MICROS
            .iter()
            .position(|bound| micros <= *bound)
        {
            self.latency_buckets[bucket].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros.fetch_add(micros, Relaxed);
    }

    /// One key-set load for `issuer`: `Some(keys)` on success.
    pub fn record_key_load(&self, issuer: &str, result: Result<usize, ()>, now_unix: i64) {
        let label = if result.is_ok() { "success" } else { "failure" };
        self.key_loads
            .entry((issuer.to_owned(), label))
            .or_default()
            .fetch_add(1, Relaxed);
        if let Ok(count) = result {
            let entry = self.keys.entry(issuer.to_owned()).or_default();
            entry.count.store(count as u64, Relaxed);
            entry.last_success_unix.store(now_unix, Relaxed);
        }
    }

    /// A request with an unknown `kid` and what came of it (`found`, `absent`, `timed_out`).
    pub fn record_unknown_kid(&self, issuer: &str, outcome: &'static str) {
        self.unknown_kids
            .entry((issuer.to_owned(), outcome))
            .or_default()
            .fetch_add(1, Relaxed);
    }

    pub fn record_token_cache(&self, event: CacheEvent) {
        self.token_cache[event as usize].fetch_add(1, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.grpc_connections.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.grpc_connections.fetch_sub(1, Relaxed);
    }

    pub fn record_accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }

    pub fn record_reload(&self, ok: bool) {
        self.reloads
            .entry(if ok { "success" } else { "failure" })
            .or_default()
            .fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Label sets in sorted order, as the map-backed families below; only those seen so far.
        let mut decisions: Vec<(Door, Outcome, Reason)> = DOORS
            .iter()
            .flat_map(|&d| OUTCOMES.iter().map(move |&o| (d, o)))
            .flat_map(|(d, o)| Reason::ALL.iter().map(move |&r| (d, o, r)))
            .collect();
        decisions.sort_by_key(|(d, o, r)| (d.as_str(), o.as_str(), r.as_str()));
        fixed_family(
            &mut out,
            "stepgate_decisions_total",
            "Decisions by front door, outcome and reason.",
            decisions.into_iter().map(|(door, outcome, reason)| {
                (
                    format!(
                        "door=\"{}\",outcome=\"{}\",reason=\"{}\"",
                        door.as_str(),
                        outcome.as_str(),
                        reason.as_str()
                    ),
                    &self.decisions[decision_slot(door, outcome, reason)],
                )
            }),
        );
        header(
            &mut out,
            "stepgate_decision_duration_seconds",
            "histogram",
            "Time to decide, from request to decision.",
        );
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BOUNDS_MICROS.iter().zip(&self.latency_buckets) {
            let le = *bound as f64 / 1e6;
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(
                out,
                "stepgate_decision_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Relaxed);
        let sum = self.latency_sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "stepgate_decision_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "stepgate_decision_duration_seconds_sum {sum}");
        let _ = writeln!(out, "stepgate_decision_duration_seconds_count {count}");
        family(
            &mut out,
            "stepgate_key_loads_total",
            "Key-set loads (start-up, refresh and on-demand) per issuer and result.",
            &self.key_loads,
            |(issuer, result)| format!("issuer=\"{issuer}\",result=\"{result}\""),
        );
        let mut keys: Vec<_> = self
            .keys
            .iter()
            .map(|e| {
                (
                    e.key().clone(),
                    e.count.load(Relaxed),
                    e.last_success_unix.load(Relaxed),
                )
            })
            .collect();
        keys.sort();
        header(
            &mut out,
            "stepgate_keys",
            "gauge",
            "Signing keys currently loaded per issuer.",
        );
        for (issuer, count, _) in &keys {
            let _ = writeln!(out, "stepgate_keys{{issuer=\"{issuer}\"}} {count}");
        }
        header(
            &mut out,
            "stepgate_key_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful key load per issuer.",
        );
        for (issuer, _, at) in &keys {
            let _ = writeln!(
                out,
                "stepgate_key_last_success_timestamp_seconds{{issuer=\"{issuer}\"}} {at}"
            );
        }
        family(
            &mut out,
            "stepgate_unknown_kid_total",
            "Tokens with a kid the issuer's keys lacked, by what an on-demand fetch found.",
            &self.unknown_kids,
            |(issuer, outcome)| format!("issuer=\"{issuer}\",outcome=\"{outcome}\""),
        );
        fixed_family(
            &mut out,
            "stepgate_token_cache_total",
            "Verified-token cache lookups (hit, miss) and evictions (size or time).",
            CacheEvent::ALL.iter().map(|&event| {
                (
                    format!("event=\"{}\"", event.as_str()),
                    &self.token_cache[event as usize],
                )
            }),
        );
        family(
            &mut out,
            "stepgate_policy_reloads_total",
            "Policy reloads by result.",
            &self.reloads,
            |result| format!("result=\"{result}\""),
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A counter family of fixed label sets, given in output order: one line per label set counted at
/// least once.
fn fixed_family<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    counters: impl Iterator<Item = (String, &'a AtomicU64)>,
) {
    header(out, name, "counter", help);
    for (labels, counter) in counters {
        let n = counter.load(Relaxed);
        if n > 0 {
            let _ = writeln!(out, "{name}{{{labels}}} {n}");
        }
    }
}

/// A counter family: one line per label set, sorted for stable output.
fn family<K: Clone + Ord + std::hash::Hash + Eq>(
    out: &mut String,
    name: &str,
    help: &str,
    counters: &DashMap<K, AtomicU64>,
    labels: impl Fn(&K) -> String,
) {
    header(out, name, "counter", help);
    let mut rows: Vec<(K, u64)> = counters
        .iter()
        .map(|e| (e.key().clone(), e.value().load(Relaxed)))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, n) in rows {
        let _ = writeln!(out, "{name}{{{}}} {n}", labels(&key));
    }
}

/// Serves `GET /metrics` (and 404 for anything else) on `addr` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;

    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    let response = if request.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(global().render())))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, hyper::http::Error>(response.expect("static response parts are valid"))
                },
            );
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_recorded_decisions_and_latency() {
        let m = Metrics::default();
        let missing = (Door::Check, Outcome::Deny, Reason::TokenMissing);
        m.record_decision(missing.0, missing.1, missing.2, Duration::from_micros(40));
        m.record_decision(missing.0, missing.1, missing.2, Duration::from_micros(400));
        m.record_decision(
            Door::Offline,
            Outcome::Allow,
            Reason::Allowed,
            Duration::ZERO,
        );
        m.record_token_cache(CacheEvent::Miss);
        m.record_token_cache(CacheEvent::Hit);
        m.record_token_cache(CacheEvent::Hit);
        m.record_key_load("demo", Ok(2), 1_700_000_000);
        m.record_key_load("demo", Err(()), 1_700_000_100);
        let text = m.render();
        assert!(text.contains("stepgate_decisions_total{door=\"check\",outcome=\"DENY\",reason=\"token_missing\"} 2"), "{text}");
        assert!(
            text.contains("stepgate_decision_duration_seconds_bucket{le=\"0.00005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_decision_duration_seconds_bucket{le=\"0.0005\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_decision_duration_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_key_loads_total{issuer=\"demo\",result=\"failure\"} 1"),
            "{text}"
        );
        assert!(text.contains("stepgate_keys{issuer=\"demo\"} 2"), "{text}");
        // Only the label sets counted, each once: distinct slots for distinct triples.
        let decisions: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("stepgate_decisions_total{"))
            .collect();
        assert_eq!(
            decisions,
            [
                "stepgate_decisions_total{door=\"check\",outcome=\"DENY\",reason=\"token_missing\"} 2",
                "stepgate_decisions_total{door=\"offline\",outcome=\"ALLOW\",reason=\"allowed\"} 1",
            ],
            "{text}"
        );
        assert!(
            text.contains("stepgate_token_cache_total{event=\"hit\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_token_cache_total{event=\"miss\"} 1"),
            "{text}"
        );
        assert!(!text.contains("event=\"evicted\""), "{text}");
        assert!(
            text.contains(
                "stepgate_key_last_success_timestamp_seconds{issuer=\"demo\"} 1700000000"
            ),
            "{text}"
        );
    }
}
