//! Recording latencies and errors, and the JSON report of one run.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies from 1 µs to 60 s with 3 significant digits, recorded in nanoseconds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// At most this many distinct error messages are kept as samples.
const ERROR_SAMPLES: usize = 5;

/// What one worker (or the whole open-loop run) saw.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            latency: new_histogram(),
            ok: 0,
            errors: 0,
            error_samples: Vec::new(),
        }
    }
}

impl Recorder {
    /// Records one answered (or failed) request. Failed requests count in the latency too: a
    /// server that fails fast must not look fast, so the error count is reported beside it.
    pub fn record(&mut self, latency: Duration, result: Result<(), String>) {
        self.latency.saturating_record(latency.as_nanos() as u64);
        match result {
            Ok(()) => self.ok += 1,
            Err(e) => self.error(e),
        }
    }

    pub fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(&message) {
            self.error_samples.push(message);
        }
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latency
            .add(&other.latency)
            .expect("histograms with the same bounds");
        self.ok += other.ok;
        self.errors += other.errors;
        for e in &other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES && !self.error_samples.contains(e) {
                self.error_samples.push(e.clone());
            }
        }
    }

    pub fn requests(&self) -> u64 {
        self.ok + self.errors
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |ns: u64| ns as f64 / 1e6;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1e6,
        }
    }
}

/// Server-side cost over the measured window, from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerCost {
    pub pid: u32,
    pub cpu_seconds: f64,
    pub cpu_us_per_request: f64,
    /// CPU seconds / wall seconds: near 1.0 for a saturated one-core server; clearly below means the
    /// generator (or something else) was the bottleneck.
    pub cpu_utilization: f64,
    pub rss_mib_before: f64,
    pub rss_mib_after: f64,
    /// VmHWM: the peak RSS since the server started.
    pub peak_rss_mib: f64,
}

/// How the generator itself fared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GeneratorStats {
    pub cpu_seconds: f64,
    pub cpu_utilization: f64,
    /// Open loop: how late requests were sent against their intended time (ms).
    pub send_lag_p99_ms: f64,
    pub send_lag_max_ms: f64,
    /// Open loop: requests that should have been sent in the run but were not.
    pub unsent: u64,
    pub max_in_flight: u64,
    /// Open loop: times the dispatcher had to wait because `--max-in-flight` requests were open.
    pub in_flight_cap_hits: u64,
    /// True when the open-loop generator could not hold the schedule (its numbers then include its
    /// own delay).
    pub fell_behind: bool,
    /// Distinct request payloads cycled, and whether the run sent more requests than that (so a
    /// token repeated and a cache could help).
    pub distinct_payloads: u64,
    pub payloads_repeated: bool,
    /// Requests sent in total, warm-up included.
    pub sent_total: u64,
}

/// The rest of the machine over the window: CPU used by neither the server, its peers nor the
/// generator (other processes; also interrupt time not charged to any), and hypervisor steal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Interference {
    pub other_cpu_seconds: f64,
    /// `other_cpu_seconds` per wall second (1.0 = a whole core).
    pub other_cpu_utilization: f64,
    pub steal_seconds: f64,
    /// CPU time of the processes serving the load with the server (`--peer-pid`): the upstream
    /// and the ext_authz server behind Envoy. Not part of `other_cpu_seconds`.
    #[serde(default)]
    pub peers_cpu_seconds: f64,
}

/// The JSON document of one run (`loadgen --json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub label: String,
    pub title: String,
    /// What served the load (`stepgate`, `empty-authz`, …) and where.
    pub target: String,
    #[serde(default)]
    pub url: String,
    pub rpc: String,
    pub scenario: String,
    /// `closed` (max throughput) or `open` (fixed rate).
    pub mode: String,
    pub connections: usize,
    pub concurrency: usize,
    /// Open loop: the requested rate (req/s).
    pub rate: Option<f64>,
    pub warmup_seconds: f64,
    /// The measured window (wall seconds).
    pub seconds: f64,
    /// Requests answered in the measured window (errors included).
    pub requests: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub throughput_rps: f64,
    pub latency_ms: Percentiles,
    pub server: Option<ServerCost>,
    pub generator: GeneratorStats,
    #[serde(default)]
    pub interference: Interference,
    /// Server RSS sampled during the measured window (MiB), with `--rss-every`.
    pub rss_samples_mib: Vec<f64>,
}

/// A millisecond value for tables: three significant digits, at least two decimals.
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

/// Requests per second for tables, with thousands separated by commas.
pub fn fmt_rps(rps: f64) -> String {
    let n = rps.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl RunReport {
    /// One line for a terminal.
    pub fn summary(&self) -> String {
        let l = &self.latency_ms;
        let mut s = format!(
            "{} [{} {}{}]: {} req/s, p50 {} p90 {} p99 {} p99.9 {} max {} ms, {} requests, {} errors",
            self.label,
            self.mode,
            self.scenario,
            self.rate
                .map(|r| format!(" @{}", fmt_rps(r)))
                .unwrap_or_default(),
            fmt_rps(self.throughput_rps),
            fmt_ms(l.p50),
            fmt_ms(l.p90),
            fmt_ms(l.p99),
            fmt_ms(l.p999),
            fmt_ms(l.max),
            self.requests,
            self.errors,
        );
        if let Some(server) = &self.server {
            s.push_str(&format!(
                ", server {:.1} µs/req CPU ({:.0} % of a core), RSS {:.1} MiB (peak {:.1})",
                server.cpu_us_per_request,
                server.cpu_utilization * 100.0,
                server.rss_mib_after,
                server.peak_rss_mib
            ));
        }
        s.push_str(&format!(
            ", generator {:.0} % of a core",
            self.generator.cpu_utilization * 100.0
        ));
        s.push_str(&format!(
            ", others {:.0} % of a core",
            self.interference.other_cpu_utilization * 100.0
        ));
        if self.generator.in_flight_cap_hits > 0 {
            s.push_str(" — SERVER OVERLOADED (in-flight cap reached)");
        } else if self.generator.fell_behind {
            s.push_str(" — GENERATOR FELL BEHIND");
        }
        if self.generator.payloads_repeated {
            s.push_str(" — payloads repeated");
        }
        for e in &self.error_samples {
            s.push_str(&format!("\n  error: {e}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_reported_in_milliseconds() {
        let mut r = Recorder::default();
        for us in 1..=1000u64 {
            r.record(Duration::from_micros(us), Ok(()));
        }
        let p = Percentiles::of(&r.latency);
        // 3 significant digits: within 0.1 %.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.001 + 1e-9;
        assert!(close(p.p50, 0.5), "{p:?}");
        assert!(close(p.p90, 0.9), "{p:?}");
        assert!(close(p.p99, 0.99), "{p:?}");
        assert!(close(p.p999, 0.999), "{p:?}");
        assert!(close(p.max, 1.0), "{p:?}");
        assert!(close(p.mean, 0.5005), "{p:?}");
        assert_eq!(Percentiles::of(&new_histogram()), Percentiles::default());
    }

    #[test]
    fn errors_are_counted_and_a_few_distinct_samples_kept() {
        let mut a = Recorder::default();
        for i in 0..20 {
            a.record(Duration::from_micros(10), Err(format!("e{}", i % 7)));
        }
        a.record(Duration::from_micros(10), Ok(()));
        assert_eq!((a.ok, a.errors, a.requests()), (1, 20, 21));
        assert_eq!(a.error_samples, ["e0", "e1", "e2", "e3", "e4"]);
        let mut b = Recorder::default();
        b.record(Duration::from_secs(120), Err("e0".into())); // beyond the histogram: saturates
        b.merge(&a);
        assert_eq!((b.ok, b.errors), (1, 21));
        assert_eq!(b.error_samples.len(), 5);
        assert!(b.latency.max() >= 59_000_000_000);
    }

    #[test]
    fn numbers_are_formatted_for_tables() {
        assert_eq!(fmt_ms(0.04213), "0.042");
        assert_eq!(fmt_ms(1.2345), "1.23");
        assert_eq!(fmt_ms(12.345), "12.3");
        assert_eq!(fmt_ms(123.45), "123");
        assert_eq!(fmt_rps(0.4), "0");
        assert_eq!(fmt_rps(999.6), "1,000");
        assert_eq!(fmt_rps(41234.0), "41,234");
        assert_eq!(fmt_rps(1234567.0), "1,234,567");
    }

    #[test]
    fn a_report_round_trips_through_json() {
        let report = RunReport {
            label: "a".into(),
            scenario: "a".into(),
            mode: "closed".into(),
            requests: 10,
            throughput_rps: 1.0,
            server: Some(ServerCost {
                pid: 1,
                cpu_us_per_request: 20.0,
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<RunReport>(&text).unwrap(), report);
        assert!(report.summary().contains("20.0 µs/req"));
    }
}
