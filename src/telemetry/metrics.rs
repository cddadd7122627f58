//! Prometheus metrics: decisions by door, outcome and reason; decision latency; key loads per
//! issuer; policy reloads. Served as text on `--metrics-listen` (`GET /metrics`).
//!
//! Counters live in one process-wide registry of atomics: recording is a map lookup and an atomic
//! add, and the label sets are bounded (reasons are a closed enum, issuers come from the policy).

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

/// Upper bounds of the latency histogram, in microseconds.
const LATENCY_BOUNDS_MICROS: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

#[derive(Default)]
pub struct Metrics {
    decisions: DashMap<(&'static str, &'static str, &'static str), AtomicU64>,
    latency_buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    key_loads: DashMap<(String, &'static str), AtomicU64>,
    keys: DashMap<String, IssuerKeys>,
    reloads: DashMap<&'static str, AtomicU64>,
    unknown_kids: DashMap<(String, &'static str), AtomicU64>,
    token_cache: DashMap<&'static str, AtomicU64>,
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
    pub fn record_decision(
        &self,
        door: &'static str,
        outcome: &'static str,
        reason: &'static str,
        elapsed: Duration,
    ) {
        increment(&self.decisions, (door, outcome, reason));
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

    /// A verified-token cache event: `hit`, `miss` or `evicted`.
    pub fn record_token_cache(&self, event: &'static str) {
        increment(&self.token_cache, event);
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
        family(
            &mut out,
            "stepgate_decisions_total",
            "Decisions by front door, outcome and reason.",
            &self.decisions,
            |(door, outcome, reason)| {
                format!("door=\"{door}\",outcome=\"{outcome}\",reason=\"{reason}\"")
            },
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
        family(
            &mut out,
            "stepgate_token_cache_total",
            "Verified-token cache lookups (hit, miss) and evictions (size or time).",
            &self.token_cache,
            |event| format!("event=\"{event}\""),
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

/// Adds one to a labelled counter: a shared (read) lock when the label set exists, which is every
/// time but the first, so concurrent requests do not serialise on a shard's write lock.
fn increment<K: std::hash::Hash + Eq>(counters: &DashMap<K, AtomicU64>, key: K) {
    if let Some(counter) = counters.get(&key) {
        counter.fetch_add(1, Relaxed);
        return;
    }
    counters.entry(key).or_default().fetch_add(1, Relaxed);
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
        m.record_decision("check", "DENY", "token_missing", Duration::from_micros(40));
        m.record_decision("check", "DENY", "token_missing", Duration::from_micros(400));
        m.record_key_load("demo", Ok(2), 1_700_000_000);
        m.record_key_load("demo", Err(()), 1_700_000_100);
        let text = m.render();
        assert!(text.contains("stepgate_decisions_total{door=\"check\",outcome=\"DENY\",reason=\"token_missing\"} 2"), "{text}");
        assert!(
            text.contains("stepgate_decision_duration_seconds_bucket{le=\"0.00005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_decision_duration_seconds_bucket{le=\"0.0005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_decision_duration_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_key_loads_total{issuer=\"demo\",result=\"failure\"} 1"),
            "{text}"
        );
        assert!(text.contains("stepgate_keys{issuer=\"demo\"} 2"), "{text}");
        assert!(
            text.contains(
                "stepgate_key_last_success_timestamp_seconds{issuer=\"demo\"} 1700000000"
            ),
            "{text}"
        );
    }
}
