//! `loadgen report`: turns the JSON files of one `bench/run` into `bench/results/<date>.md` — the
//! table of runs, memory, the issue's targets with PASS/MISS, and ratios against the baseline.
//!
//! Input files (in one folder): `run-*.json` (a `RunReport` each, rows in file-name order),
//! `verify-*.json` (a `VerifyCost` each), `mem-*.json` (a `MemPoint` each) and `replay-*.json`
//! (a timed `stepgate replay`, `ReplayRun`, rows `replay` and `replay-baseline`) and
//! `compile-*.json` (the policies of the rule-index rows `rules-N`, `RulesPolicy`). Rows are found by
//! label: `empty`, `a`, `b-rs256`, `empty-open`, `a-open`, `rss-100k-fill`, `rss-100k-steady`,
//! the peer `cerbos-a`, the Envoy pair `f-envoy-only` / `f-envoy-stepgate`, the path-glob pair
//! `g-glob-plain` / `g-glob-worst`, `rss-8k-fill` / `rss-8k-nocache`, and the memory points
//! `stepgate-start` and `stepgate-8k-{start,fill}`, `stepgate-8k-nocache-{start,fill}`. Other rows are listed in the table and the ratios without a target of their
//! own. A label that appears in several files is a repeated row: every run is listed, the tables
//! show it by its medians (`Input::judged`), and a target comparing two repeated rows judges the
//! median of the rounds' own figures (`Input::per_round`).

use std::{fmt::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    records::ReplayRun,
    rules::RulesPolicy,
    scenario::RSS_8K_CLAIM_BYTES,
    stats::{Percentiles, RunReport, ServerCost, fmt_ms, fmt_rps},
    verify::VerifyCost,
};

/// Other CPU use (in cores) above which a row is reported as disturbed.
pub const OTHER_CPU_WARNING: f64 = 0.10;

/// A server's memory at one point (`loadgen mem`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemPoint {
    pub label: String,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
    /// stepgate's verified-token cache at the same moment, when its metrics were read
    /// (`loadgen mem --metrics-url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_cache: Option<CacheGauges>,
}

/// stepgate's verified-token cache by its own metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CacheGauges {
    /// `stepgate_token_cache_entries`.
    pub entries: u64,
    /// `stepgate_token_cache_bytes`: the cache's estimate of the memory its tokens take, which
    /// `limits.token_cache_bytes` bounds.
    pub mib: f64,
    /// `stepgate_token_cache_total{event="evicted"}`: tokens dropped to stay within the budgets
    /// (or expired).
    pub evicted: u64,
}

impl CacheGauges {
    /// Reads the gauges from a Prometheus text exposition (`GET /metrics`).
    pub fn parse(metrics: &str) -> Result<Self, String> {
        let value = |name: &str| {
            metrics
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split_once(' '))
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        };
        let missing = |name: &str| format!("the metrics have no {name}");
        let entries = value("stepgate_token_cache_entries")
            .ok_or_else(|| missing("stepgate_token_cache_entries"))?;
        let bytes = value("stepgate_token_cache_bytes")
            .ok_or_else(|| missing("stepgate_token_cache_bytes"))?;
        Ok(Self {
            entries: entries as u64,
            mib: bytes / (1024.0 * 1024.0),
            // A labelled counter appears once it has counted something.
            evicted: value("stepgate_token_cache_total{event=\"evicted\"}").unwrap_or(0.0) as u64,
        })
    }
}

#[derive(Debug, Clone, Default)]
pub struct Input {
    pub title: String,
    /// `key: value` lines for the header (commit, machine, settings, …).
    pub meta: Vec<(String, String)>,
    pub runs: Vec<RunReport>,
    pub verifies: Vec<VerifyCost>,
    pub memory: Vec<MemPoint>,
    pub replays: Vec<ReplayRun>,
    pub compiles: Vec<RulesPolicy>,
}

/// Reads the files of one run from `dir`.
pub fn load(dir: &Path) -> Result<Input, String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let mut input = Input::default();
    for name in names {
        let path = dir.join(&name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let bad = |e: serde_json::Error| format!("{}: {e}", path.display());
        if name.starts_with("run-") {
            input.runs.push(serde_json::from_str(&text).map_err(bad)?);
        } else if name.starts_with("verify-") {
            input
                .verifies
                .push(serde_json::from_str(&text).map_err(bad)?);
        } else if name.starts_with("mem-") {
            input.memory.push(serde_json::from_str(&text).map_err(bad)?);
        } else if name.starts_with("replay-") {
            input
                .replays
                .push(serde_json::from_str(&text).map_err(bad)?);
        } else if name.starts_with("compile-") {
            input
                .compiles
                .push(serde_json::from_str(&text).map_err(bad)?);
        }
    }
    Ok(input)
}

/// One line of the "Targets" section.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub measured: String,
    pub limit: String,
    /// `None`: not measured in this run.
    pub pass: Option<bool>,
    pub note: String,
}

impl Target {
    fn missing(name: &str, limit: &str, what: &str) -> Self {
        Self {
            name: name.into(),
            measured: "—".into(),
            limit: limit.into(),
            pass: None,
            note: format!("not measured ({what} missing)"),
        }
    }

    /// A comparison that cannot count because a row it needs had wrong or failed answers, or
    /// answered nothing.
    fn invalid(name: &str, limit: String, rows: &[&RunReport]) -> Option<Self> {
        let bad: Vec<String> = rows
            .iter()
            .filter_map(|r| match (r.errors, r.requests) {
                (0, 0) => Some(format!("{} answered no request", r.label)),
                (0, _) => None,
                (errors, _) => Some(format!(
                    "{} had {errors} errors ({})",
                    r.label,
                    r.error_samples.first().map_or("", String::as_str)
                )),
            })
            .collect();
        (!bad.is_empty()).then(|| Self {
            name: name.into(),
            measured: "—".into(),
            limit,
            pass: None,
            note: format!("not comparable: {}", bad.join("; ")),
        })
    }

    pub fn verdict(&self) -> &'static str {
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a",
        }
    }
}

impl Input {
    pub fn run(&self, label: &str) -> Option<&RunReport> {
        self.runs.iter().find(|r| r.label == label)
    }

    /// Every run of a row that `bench/run` repeats (`BENCH_REPEAT` alternating runs of the
    /// closed-loop, open-loop and Envoy groups: one run of each is at the mercy of a noisy moment).
    pub fn runs_of(&self, label: &str) -> Vec<&RunReport> {
        self.runs.iter().filter(|r| r.label == label).collect()
    }

    /// A row as the targets judge it: its run, or for a row `bench/run` repeats (alternating with
    /// the rows it is compared with, `BENCH_REPEAT` times) the median of its runs, figure by
    /// figure: on this kind of machine one 10 s window is now and then slowed by 20 % with no
    /// steal time to show for it, and a median of three alternating runs is not moved by one such
    /// window. Errors add up over the runs, so a wrong answer in any run voids a comparison.
    pub fn judged(&self, label: &str) -> Option<RunReport> {
        let runs = self.runs_of(label);
        let (first, rest) = runs.split_first()?;
        let mut judged = (*first).clone();
        if rest.is_empty() {
            return Some(judged);
        }
        let mid =
            |pick: fn(&RunReport) -> f64| median(&runs.iter().map(|r| pick(r)).collect::<Vec<_>>());
        judged.throughput_rps = mid(|r| r.throughput_rps);
        judged.latency_ms = Percentiles {
            p50: mid(|r| r.latency_ms.p50),
            p90: mid(|r| r.latency_ms.p90),
            p99: mid(|r| r.latency_ms.p99),
            p999: mid(|r| r.latency_ms.p999),
            max: mid(|r| r.latency_ms.max),
            mean: mid(|r| r.latency_ms.mean),
        };
        let costs: Vec<ServerCost> = runs.iter().filter_map(|r| r.server).collect();
        if let Some(server) = judged.server.as_mut().filter(|_| costs.len() == runs.len()) {
            let mid =
                |pick: fn(&ServerCost) -> f64| median(&costs.iter().map(pick).collect::<Vec<_>>());
            server.cpu_seconds = mid(|s| s.cpu_seconds);
            server.cpu_us_per_request = mid(|s| s.cpu_us_per_request);
            server.cpu_utilization = mid(|s| s.cpu_utilization);
            server.peak_rss_mib = costs.iter().map(|s| s.peak_rss_mib).fold(0.0, f64::max);
        } else {
            judged.server = None;
        }
        // A run that answered nothing (a failed row) voids the row, as an error does.
        judged.requests = match runs.iter().any(|r| r.requests == 0) {
            true => 0,
            false => mid(|r| r.requests as f64).round() as u64,
        };
        for r in rest {
            judged.errors += r.errors;
            judged.error_samples.extend(r.error_samples.iter().cloned());
            judged.generator.fell_behind |= r.generator.fell_behind;
            judged.generator.in_flight_cap_hits += r.generator.in_flight_cap_hits;
        }
        judged.interference.other_cpu_utilization = mid(|r| r.interference.other_cpu_utilization);
        judged.interference.peers_cpu_seconds = mid(|r| r.interference.peers_cpu_seconds);
        Some(judged)
    }

    /// "X vs Y req/s" for two judged rows (label, name in the note, the row), with each run's
    /// throughput when they were repeated.
    fn throughput_note(&self, [(la, na, a), (lb, nb, b)]: [(&str, &str, &RunReport); 2]) -> String {
        format!(
            "{} vs {} req/s{}",
            fmt_rps(a.throughput_rps),
            fmt_rps(b.throughput_rps),
            self.repeats_note(&[(la, na), (lb, nb)], |r| fmt_rps(r.throughput_rps))
        )
    }

    /// "; medians of N alternating runs (stepgate …; empty …)" for targets judged on repeated rows,
    /// listing each run's figure; empty when every row ran once.
    fn repeats_note(&self, rows: &[(&str, &str)], figure: impl Fn(&RunReport) -> String) -> String {
        let lists: Vec<(&str, Vec<String>)> = rows
            .iter()
            .map(|(label, name)| {
                (
                    *name,
                    self.runs_of(label).into_iter().map(&figure).collect(),
                )
            })
            .filter(|(_, values): &(&str, Vec<String>)| !values.is_empty())
            .collect();
        let most = lists.iter().map(|(_, l)| l.len()).max().unwrap_or(0);
        if most <= 1 {
            return String::new();
        }
        let listed: Vec<String> = lists
            .iter()
            .map(|(name, values)| format!("{name} {}", values.join(", ")))
            .collect();
        format!(
            "; medians of {most} alternating runs ({})",
            listed.join("; ")
        )
    }

    /// A comparison of row `label` with row `base` as the targets judge it. When both ran the
    /// same number of alternating rounds (two or more), it is the median of the rounds' own
    /// figures, each run of `label` against the run of `base` from its round: the two ran within
    /// the same minute, so a slow stretch of the machine (the canned floor's own CPU per request
    /// has moved 12.4–15.1 µs between the rounds of one run) moves both and the round's figure
    /// cancels it, where each row's median can come from a different stretch. Otherwise it is
    /// `overall`, the figure of the two rows' medians. Returns the judged figure and, for rounds,
    /// a note listing each round's figure beside `overall` (`show` formats one).
    fn per_round(
        &self,
        (label, base): (&str, &str),
        figure: impl Fn(&RunReport, &RunReport) -> Option<f64>,
        overall: f64,
        show: impl Fn(f64) -> String,
    ) -> (f64, String) {
        let (rows, bases) = (self.runs_of(label), self.runs_of(base));
        if rows.len() < 2 || rows.len() != bases.len() {
            return (overall, String::new());
        }
        let rounds: Option<Vec<f64>> = rows.iter().zip(&bases).map(|(r, b)| figure(r, b)).collect();
        let Some(rounds) = rounds.filter(|r| r.iter().all(|v| v.is_finite())) else {
            return (overall, String::new());
        };
        let judged = median(&rounds);
        let listed: Vec<String> = rounds.iter().map(|v| show(*v)).collect();
        let note = format!(
            "; judged round by round: the median of {} rounds ({}), where the medians give {}",
            rounds.len(),
            listed.join(", "),
            show(overall)
        );
        (judged, note)
    }

    pub fn memory_point(&self, label: &str) -> Option<&MemPoint> {
        self.memory.iter().find(|m| m.label == label)
    }

    pub fn verify(&self, algorithm: &str) -> Option<&VerifyCost> {
        self.verifies.iter().find(|v| v.algorithm == algorithm)
    }

    /// Row `label`'s throughput against the empty server's, at ≥ 0.80×.
    fn against_empty(&self, label: &str, name: &str, who: &str, min: f64) -> Target {
        let limit = format!("≥ {min:.3}×");
        let limit = limit.as_str();
        match (self.judged(label).as_ref(), self.judged("empty").as_ref()) {
            (Some(row), Some(e)) if e.throughput_rps > 0.0 => {
                Target::invalid(name, limit.into(), &[row, e]).unwrap_or_else(|| {
                    let (ratio, rounds) = self.per_round(
                        (label, "empty"),
                        throughput_ratio,
                        row.throughput_rps / e.throughput_rps,
                        |v| format!("{v:.3}×"),
                    );
                    Target {
                        name: name.into(),
                        measured: format!("{ratio:.3}×"),
                        limit: limit.into(),
                        pass: Some(ratio >= min),
                        note: self.throughput_note([(label, who, row), ("empty", "empty", e)])
                            + &rounds,
                    }
                })
            }
            _ => Target::missing(name, limit, &format!("rows {label} and empty")),
        }
    }

    /// The issue's targets, in its order.
    pub fn targets(&self) -> Vec<Target> {
        let mut out = Vec::new();
        let empty = self.judged("empty");
        let a = self.judged("a");
        let (empty, a) = (empty.as_ref(), a.as_ref());

        // (a) cached-token throughput.
        let name = "(a) cached-token Check throughput ≥ 0.85 × empty server's";
        match (a, empty) {
            (Some(a), Some(e)) if e.throughput_rps > 0.0 => {
                let invalid = Target::invalid(name, "≥ 0.850×".into(), &[a, e]);
                out.push(invalid.unwrap_or_else(|| {
                    let (ratio, rounds) = self.per_round(
                        ("a", "empty"),
                        throughput_ratio,
                        a.throughput_rps / e.throughput_rps,
                        |v| format!("{v:.3}×"),
                    );
                    let mut note =
                        self.throughput_note([("a", "stepgate", a), ("empty", "empty", e)]);
                    note.push_str(&rounds);
                    if let Some(cpu) = e.server.map(|s| s.cpu_utilization)
                        && cpu < 0.9
                    {
                        let _ = write!(
                            note,
                            "; the empty server used only {:.0} % of its core: the generator \
                             limited it, so this ratio flatters stepgate — compare CPU µs/req",
                            cpu * 100.0
                        );
                    }
                    Target {
                        name: name.into(),
                        measured: format!("{ratio:.3}×"),
                        limit: "≥ 0.850×".into(),
                        pass: Some(ratio >= 0.85),
                        note,
                    }
                }));
            }
            _ => out.push(Target::missing(name, "≥ 0.850×", "rows a and empty")),
        }

        // (a) open-loop latency at half the empty server's max rate.
        out.extend(self.open_targets(
            "(a) open loop at ½ empty max rate",
            ("a-open", "stepgate"),
            ("empty-open", "empty"),
            a,
        ));

        out.push(self.uncached_target(empty));

        // Memory.
        let name = "RSS after start ≤ 32 MiB";
        match self.memory_point("stepgate-start") {
            Some(m) => out.push(Target {
                name: name.into(),
                measured: format!("{:.1} MiB", m.rss_mib),
                limit: "≤ 32 MiB".into(),
                pass: Some(m.rss_mib <= 32.0),
                note: String::new(),
            }),
            None => out.push(Target::missing(
                name,
                "≤ 32 MiB",
                "memory point stepgate-start",
            )),
        }
        let fill = self.run("rss-100k-fill");
        let steady = self.run("rss-100k-steady");
        let name = "RSS with 100 000 distinct cached tokens ≤ 96 MiB";
        let after_fill = fill.and_then(|f| f.server).map(|s| s.rss_mib_after);
        match (after_fill, fill) {
            (Some(rss), Some(f)) => out.push(Target {
                name: name.into(),
                measured: format!("{rss:.1} MiB"),
                limit: "≤ 96 MiB".into(),
                pass: Some(rss <= 96.0 && f.errors == 0),
                note: format!(
                    "after {} distinct tokens (peak {:.1} MiB)",
                    f.generator.sent_total,
                    f.server.map_or(0.0, |s| s.peak_rss_mib)
                ),
            }),
            _ => out.push(Target::missing(name, "≤ 96 MiB", "row rss-100k-fill")),
        }
        let name = "… and flat (±5 %) over a steady run";
        match (after_fill, steady) {
            (Some(base), Some(s)) if !s.rss_samples_mib.is_empty() => {
                let (dev, lo, hi) = deviation(base, &s.rss_samples_mib);
                let mut note = format!(
                    "{} samples over {:.0} s: {lo:.1}–{hi:.1} MiB against {base:.1} MiB after the fill",
                    s.rss_samples_mib.len(),
                    s.seconds
                );
                // Tells a one-time step at the start (allocator warm-up) from growth: the spread
                // of the samples after the first 10 s, against the first of them.
                if let Some(later) = s.rss_samples_mib.get(10..).filter(|l| l.len() >= 10) {
                    let (drift, lo, hi) = deviation(later[0], later);
                    let _ = write!(
                        note,
                        "; after the first 10 s: {lo:.1}–{hi:.1} MiB ({:+.1} % from {:.1} MiB)",
                        drift * 100.0,
                        later[0]
                    );
                }
                out.push(Target {
                    name: name.into(),
                    measured: format!("{:+.1} %", dev * 100.0),
                    limit: "within ±5 %".into(),
                    pass: Some(dev.abs() <= 0.05),
                    note,
                });
            }
            _ => out.push(Target::missing(name, "within ±5 %", "row rss-100k-steady")),
        }

        self.cerbos_targets(a, &mut out);
        self.envoy_targets(&mut out);
        out.push(self.glob_target());
        out.push(self.cache_budget_target());

        // Traces: row a with 10 % of the decisions traced and exported.
        out.push(self.against_empty(
            "a-traced",
            "(traces) cached Check, traces on at 10 % sampling ≥ 0.80 × empty server's",
            "stepgate traced",
            0.80,
        ));

        // Operators' blocks: row a with 1000 subjects blocked (in-memory store).
        out.push(self.against_empty(
            "a-blocks",
            "(risk) cached Check, 1000 blocks in force (in-memory store) ≥ 0.80 × empty server's",
            "stepgate with blocks",
            0.80,
        ));

        // Risk signals: row a on bench/policies/risk.yaml (a step-up signal read on every
        // decision, a distinct-sources signal counting every allowed request), in memory and
        // with the Redis store; and the memory of a million tracked keys.
        out.push(self.against_empty(
            "a-risk",
            "(risk) cached Check, risk signals on (in-memory store) ≥ 0.80 × empty server's",
            "stepgate with risk signals",
            0.80,
        ));
        out.push(self.against_empty(
            "a-risk-redis",
            "(risk) cached Check, risk signals on, Redis store ≥ 0.75 × empty server's",
            "stepgate with risk signals and Redis",
            0.75,
        ));
        out.push(self.risk_keys_target());
        out.push(self.records_target());
        out.push(self.replay_target());
        out.push(self.rules_target(1000, 1.2));
        out.push(self.rules_target(10_000, 1.5));
        out.extend(self.canned_targets());
        out.push(self.log_target());
        out.push(self.two_core_target());
        out
    }

    /// Row `label`'s server CPU per request against row `base`'s, at most `max`×: the target,
    /// with the two figures and both throughputs in its note (`who`: what `label`'s throughput
    /// is), or why it cannot be judged. Also returns `base`'s CPU per request.
    fn cpu_ratio_target(
        &self,
        name: &str,
        (label, who): (&str, &str),
        base: &str,
        max: f64,
    ) -> (Target, Option<f64>) {
        let limit = format!("≤ {max:.3}×");
        let cpu = |label: &str| {
            self.judged(label)
                .and_then(|r| r.server.map(|s| (s.cpu_us_per_request, r.throughput_rps)))
        };
        let (Some((row, row_rps)), Some((one, one_rps))) = (cpu(label), cpu(base)) else {
            let missing = format!("server CPU of rows {label} and {base}");
            return (Target::missing(name, &limit, &missing), None);
        };
        if let Some(t) = [self.judged(label), self.judged(base)]
            .iter()
            .flatten()
            .find_map(|r| Target::invalid(name, limit.clone(), &[r]))
        {
            return (t, None);
        }
        let (ratio, rounds) = self.per_round((label, base), cpu_ratio, row / one.max(1e-9), |v| {
            format!("{v:.3}×")
        });
        let target = Target {
            name: name.into(),
            measured: format!("{ratio:.3}×"),
            limit,
            pass: Some(ratio <= max),
            note: format!(
                "{row:.1} vs {one:.1} µs/req; throughput {}{who} vs {} req/s{}{rounds}",
                fmt_rps(row_rps),
                fmt_rps(one_rps),
                self.repeats_note(&[(label, label), (base, base)], |r| opt(
                    r.server.map(|s| s.cpu_us_per_request),
                    |v| format!("{v:.1}")
                ))
            ),
        };
        (target, Some(one))
    }

    /// Two workers on two cores (shared with the generator): server CPU per request does not grow
    /// against one worker on one core (row a), within the run's resolution (5 %).
    /// Beside it, when measured: the same pair for `--balance calls` (a-2core-calls) and for the
    /// two floors (empty-2core against empty, canned-2core against canned), which tell what the
    /// shared cores cost any server.
    fn two_core_target(&self) -> Target {
        let mut target = self
            .cpu_ratio_target(
                "(cores) 2 workers on 2 cores: server CPU per request ≤ 1.05 × one core's (a)",
                ("a-2core", " (2 cores shared with the generator)"),
                "a",
                1.05,
            )
            .0;
        let cpu = |label: &str| {
            self.judged(label)
                .and_then(|r| r.server.map(|s| s.cpu_us_per_request))
        };
        for (label, base, what) in [
            ("a-2core-calls", "a", "--balance calls"),
            ("empty-2core", "empty", "the tonic floor"),
            ("canned-2core", "canned", "the canned floor"),
        ] {
            if let (Some(two), Some(one)) = (cpu(label), cpu(base)) {
                let _ = write!(
                    target.note,
                    "; {what} ({label} vs {base}): {two:.1} vs {one:.1} µs/req ({:.2}×)",
                    two / one.max(1e-9)
                );
            }
        }
        target
    }

    /// The default decision log (ALLOW lines at debug, so none for scenario a) costs at most 5 %
    /// of server CPU per request against no decision line at all (a-quiet); every decision
    /// logged (a-log-all) and one ALLOW in a hundred (a-log-sampled) are reported beside it.
    fn log_target(&self) -> Target {
        let (mut target, quiet) = self.cpu_ratio_target(
            "(log) the default decision log costs ≤ 5 % of server CPU per request (a against a-quiet)",
            ("a", ""),
            "a-quiet",
            1.05,
        );
        let Some(quiet) = quiet else {
            return target;
        };
        let cpu = |label: &str| {
            self.judged(label)
                .and_then(|r| r.server.map(|s| (s.cpu_us_per_request, r.throughput_rps)))
        };
        let note = &mut target.note;
        for (label, what) in [
            ("a-log-all", "every decision logged"),
            ("a-log-sampled", "1 % of ALLOWs"),
        ] {
            if let Some((c, rps)) = cpu(label) {
                let _ = write!(
                    note,
                    "; {what} ({label}): {c:.1} µs/req ({:.2}×), {} req/s",
                    c / quiet.max(1e-9),
                    fmt_rps(rps)
                );
            }
        }
        target
    }

    /// Open-loop latency of stepgate against a floor at the same rate: p50 at most 0.05 ms above
    /// the floor's, p99 at most 1.25× the floor's, judged round by round when both rows were
    /// repeated ([`Input::per_round`]), else on the medians (`closed`: stepgate's closed-loop
    /// row, to tell an overloaded server).
    fn open_targets(
        &self,
        title: &str,
        (a_label, a_name): (&str, &str),
        (floor_label, floor_name): (&str, &str),
        closed: Option<&RunReport>,
    ) -> Vec<Target> {
        let (a_open, floor) = (self.judged(a_label), self.judged(floor_label));
        let open_rows = [(a_label, a_name), (floor_label, floor_name)];
        let mut out = Vec::new();
        for quantile in ["p50", "p99"] {
            let (name, limit) = match quantile {
                "p50" => (
                    format!("{title}: p50 ≤ {floor_name} p50 + 0.05 ms"),
                    "≤ +0.050 ms",
                ),
                _ => (format!("{title}: p99 ≤ 1.25 × {floor_name} p99"), "≤ 1.25×"),
            };
            let (Some(a_run), Some(e)) = (&a_open, &floor) else {
                out.push(Target::missing(
                    &name,
                    limit,
                    &format!("rows {a_label} and {floor_label}"),
                ));
                continue;
            };
            if let Some(t) = Target::invalid(&name, limit.into(), &[a_run, e]) {
                out.push(t);
                continue;
            }
            let pick = |r: &RunReport| match quantile {
                "p50" => r.latency_ms.p50,
                _ => r.latency_ms.p99,
            };
            let (a_ms, floor_ms) = (pick(a_run), pick(e));
            let figures = format!(
                "{a_name} {} ms, {floor_name} {} ms at {} req/s",
                fmt_ms(a_ms),
                fmt_ms(floor_ms),
                fmt_rps(e.rate.unwrap_or_default())
            );
            let rows = (a_label, floor_label);
            let (measured, pass, rounds) = match quantile {
                "p50" => {
                    let show = |v: f64| format!("{v:+.3} ms");
                    let (added, rounds) =
                        self.per_round(rows, |a, f| Some(pick(a) - pick(f)), a_ms - floor_ms, show);
                    (show(added), added <= 0.05, rounds)
                }
                _ => {
                    let show = |v: f64| format!("{v:.2}×");
                    let ratio = |a: f64, f: f64| (f > 0.0).then(|| a / f);
                    let overall = ratio(a_ms, floor_ms).unwrap_or(f64::INFINITY);
                    let (times, rounds) =
                        self.per_round(rows, |a, f| ratio(pick(a), pick(f)), overall, show);
                    (show(times), times <= 1.25, rounds)
                }
            };
            out.push(Target {
                name,
                measured,
                limit: limit.into(),
                pass: Some(pass),
                note: format!(
                    "{figures}{}{rounds}{}",
                    self.repeats_note(&open_rows, |r| fmt_ms(pick(r))),
                    overload_note(a_run, closed)
                ),
            });
        }
        out
    }

    /// The canned-response floor (HTTP/2 frames without tonic): stepgate's cached `Check` keeps
    /// at least 0.9 of its throughput, and paced at 20 000 req/s stays within +0.05 ms at p50 and
    /// 1.25× at p99.
    fn canned_targets(&self) -> Vec<Target> {
        let mut floor = self.against_floor("a", "canned", 0.9);
        // What of the gap is hyper's server, and what is stepgate's own code above it.
        let cpu = |label: &str| {
            self.judged(label)
                .and_then(|r| r.server.map(|s| s.cpu_us_per_request))
        };
        if let (Some(hyper), Some(canned)) = (cpu("canned-hyper"), cpu("canned")) {
            let _ = write!(
                floor.note,
                "; the same answers through hyper's server (canned-hyper): {hyper:.1} µs/req \
                 ({:.2}× the canned floor's)",
                hyper / canned.max(1e-9)
            );
        }
        let mut out = vec![floor];
        out.extend(self.open_targets(
            "(floor) open loop at 20 000 req/s",
            ("a-open-20k", "stepgate"),
            ("canned-open-20k", "canned"),
            self.judged("a").as_ref(),
        ));
        out
    }

    /// Row `label`'s throughput against the floor row `floor`'s, at ≥ `min`×, with CPU per
    /// request in the note (a generator-bound run shows the difference there, not in req/s).
    fn against_floor(&self, label: &str, floor: &str, min: f64) -> Target {
        let name = format!("(floor) cached Check throughput ≥ {min:.2} × the {floor} floor's");
        let limit = format!("≥ {min:.3}×");
        match (self.judged(label).as_ref(), self.judged(floor).as_ref()) {
            (Some(row), Some(f)) if f.throughput_rps > 0.0 => {
                Target::invalid(&name, limit.clone(), &[row, f]).unwrap_or_else(|| {
                    let (ratio, rounds) = self.per_round(
                        (label, floor),
                        throughput_ratio,
                        row.throughput_rps / f.throughput_rps,
                        |v| format!("{v:.3}×"),
                    );
                    let cpu = |r: &RunReport| r.server.map(|s| s.cpu_us_per_request);
                    let cpu_note = match (cpu(row), cpu(f)) {
                        (Some(a), Some(b)) if b > 0.0 => {
                            format!("; server CPU {a:.1} vs {b:.1} µs/req ({:.2}×)", a / b)
                        }
                        _ => String::new(),
                    };
                    Target {
                        name: name.clone(),
                        measured: format!("{ratio:.3}×"),
                        limit: limit.clone(),
                        pass: Some(ratio >= min),
                        note: format!(
                            "{}{cpu_note}{rounds}",
                            self.throughput_note([(label, "stepgate", row), (floor, floor, f)])
                        ),
                    }
                })
            }
            _ => Target::missing(&name, &limit, &format!("rows {label} and {floor}")),
        }
    }

    /// A policy of `rules` rules decides scenario a by its last rule at most `max` times the
    /// server CPU per request of a one-rule policy (the rule index, judged round by round).
    fn rules_target(&self, rules: usize, max: f64) -> Target {
        let name = format!(
            "(index) {rules} rules, the last one deciding: CPU per request ≤ {max:.1} × one rule's"
        );
        let limit = format!("≤ {max:.2}×");
        let label = format!("rules-{rules}");
        let (one, many) = (self.judged("rules-1"), self.judged(&label));
        let cpu = |r: &RunReport| r.server.map(|s| s.cpu_us_per_request);
        let Some((one, many, one_cpu, many_cpu)) = one
            .as_ref()
            .zip(many.as_ref())
            .and_then(|(o, m)| Some((o, m, cpu(o)?, cpu(m)?)))
        else {
            return Target::missing(
                &name,
                &limit,
                &format!("server CPU of rows rules-1 and {label}"),
            );
        };
        if let Some(t) = Target::invalid(&name, limit.clone(), &[one, many]) {
            return t;
        }
        if one_cpu <= 0.0 || one.throughput_rps <= 0.0 {
            return Target::missing(&name, &limit, "a one-rule cost above zero");
        }
        let (ratio, rounds) = self.per_round(
            (label.as_str(), "rules-1"),
            cpu_ratio,
            many_cpu / one_cpu,
            |v| format!("{v:.2}×"),
        );
        let compile = self
            .compiles
            .iter()
            .find(|c| c.rules == rules)
            .map(|c| {
                format!(
                    "; compiled in {:.0} ms ({} KiB)",
                    c.compile_ms,
                    c.bytes / 1024
                )
            })
            .unwrap_or_default();
        Target {
            name,
            measured: format!("{ratio:.2}×"),
            limit,
            pass: Some(ratio <= max),
            note: format!(
                "{many_cpu:.1} vs {one_cpu:.1} µs/req; throughput {} vs {} req/s ({:.2}×){compile}{}{rounds}",
                fmt_rps(many.throughput_rps),
                fmt_rps(one.throughput_rps),
                many.throughput_rps / one.throughput_rps,
                self.repeats_note(&[(label.as_str(), "many"), ("rules-1", "one")], |r| opt(
                    cpu(r),
                    |v| format!("{v:.1}")
                ))
            ),
        }
    }

    /// `stepgate replay` of a million records against a candidate policy, pinned to one core,
    /// replays at least 200 000 records a second (the median of the repeated runs).
    fn replay_target(&self) -> Target {
        let name = "(replay) `stepgate replay` on one core ≥ 200 000 records/s";
        let limit = "≥ 200 000/s";
        let runs: Vec<&ReplayRun> = self
            .replays
            .iter()
            .filter(|r| r.label == "replay")
            .collect();
        if runs.is_empty() {
            return Target::missing(name, limit, "row replay");
        }
        let rate = median(
            &runs
                .iter()
                .map(|r| r.records_per_second)
                .collect::<Vec<_>>(),
        );
        let listed: Vec<String> = runs.iter().map(|r| fmt_rps(r.records_per_second)).collect();
        let mut note = format!(
            "{} records, {:.0} changed; records/s of {} run(s): {}",
            runs[0].records,
            runs[0].changed,
            runs.len(),
            listed.join(", ")
        );
        if let Some(b) = self.replays.iter().find(|r| r.label == "replay-baseline") {
            let _ = write!(
                note,
                "; with --baseline (every record decided twice): {}/s",
                fmt_rps(b.records_per_second)
            );
        }
        Target {
            name: name.into(),
            measured: format!("{}/s", fmt_rps(rate)),
            limit: limit.into(),
            pass: Some(rate >= 200_000.0),
            note,
        }
    }

    /// Decision records on (every ALLOW recorded to a file) cost at most 5 % of the cached
    /// `Check`'s throughput, judged round by round on the alternating rows a and a-records.
    fn records_target(&self) -> Target {
        let name =
            "(records) cached Check with a decision record per request ≥ 0.95 × a's throughput";
        let limit = "≥ 0.950×";
        match (self.judged("a-records").as_ref(), self.judged("a").as_ref()) {
            (Some(row), Some(a)) if a.throughput_rps > 0.0 => {
                Target::invalid(name, limit.into(), &[row, a]).unwrap_or_else(|| {
                    let (ratio, rounds) = self.per_round(
                        ("a-records", "a"),
                        throughput_ratio,
                        row.throughput_rps / a.throughput_rps,
                        |v| format!("{v:.3}×"),
                    );
                    Target {
                        name: name.into(),
                        measured: format!("{ratio:.3}×"),
                        limit: limit.into(),
                        pass: Some(ratio >= 0.95),
                        note: self.throughput_note([
                            ("a-records", "stepgate with records", row),
                            ("a", "stepgate", a),
                        ]) + &rounds,
                    }
                })
            }
            _ => Target::missing(name, limit, "rows a-records and a"),
        }
    }

    /// A million distinct sources counted by one signal (risk.max_keys 1 000 000): the server's
    /// RSS grows by at most the documented bytes per key (docs/risk.md).
    fn risk_keys_target(&self) -> Target {
        const KEYS: f64 = 1_000_000.0;
        const BYTES_PER_KEY: f64 = 300.0;
        let name = "(risk) 1 000 000 distinct source keys tracked: RSS growth ≤ 300 B per key";
        let limit = "≤ 286.1 MiB";
        let (Some(start), Some(filled), Some(fill)) = (
            self.memory_point("stepgate-risk-start"),
            self.memory_point("stepgate-risk-1m"),
            self.run("rss-risk-1m"),
        ) else {
            return Target::missing(name, limit, "row rss-risk-1m and its memory points");
        };
        if let Some(t) = Target::invalid(name, limit.into(), &[fill]) {
            return t;
        }
        let growth = filled.rss_mib - start.rss_mib;
        let bound = KEYS * BYTES_PER_KEY / (1024.0 * 1024.0);
        let sent = fill.generator.sent_total;
        Target {
            name: name.into(),
            measured: format!("{growth:+.1} MiB"),
            limit: limit.into(),
            pass: (sent as f64 >= KEYS).then_some(growth <= bound),
            note: format!(
                "{:.1} → {:.1} MiB after {sent} requests from distinct sources ({:.0} B per key)",
                start.rss_mib,
                filled.rss_mib,
                growth * 1024.0 * 1024.0 / KEYS
            ),
        }
    }

    /// The path matcher's worst case: one server (bench/policies/glob-worst.yaml) decides a plain
    /// path and a path of 1500 `/a` segments that its first rule, `/**/a/**/a/**/z`, must reject,
    /// both without a token (401 token_missing from the catch-all). The worst case may cost at most
    /// twice the plain decision, in server CPU per request.
    fn glob_target(&self) -> Target {
        let name = "glob worst case (`/**/a/**/a/**/z` against 1500 segments) ≤ 2 × a plain-path \
                    decision, CPU per request";
        let limit = "≤ 2.00×";
        let (plain, worst) = (self.judged("g-glob-plain"), self.judged("g-glob-worst"));
        let cpu = |r: &RunReport| r.server.map(|s| s.cpu_us_per_request);
        let Some((plain, worst, plain_cpu, worst_cpu)) = plain
            .as_ref()
            .zip(worst.as_ref())
            .and_then(|(p, w)| Some((p, w, cpu(p)?, cpu(w)?)))
        else {
            return Target::missing(
                name,
                limit,
                "server CPU of rows g-glob-plain and g-glob-worst",
            );
        };
        if let Some(t) = Target::invalid(name, limit.into(), &[plain, worst]) {
            return t;
        }
        if plain_cpu <= 0.0 || plain.throughput_rps <= 0.0 {
            return Target::missing(name, limit, "a plain-path cost above zero");
        }
        let (ratio, rounds) = self.per_round(
            ("g-glob-worst", "g-glob-plain"),
            cpu_ratio,
            worst_cpu / plain_cpu,
            |v| format!("{v:.2}×"),
        );
        Target {
            name: name.into(),
            measured: format!("{ratio:.2}×"),
            limit: limit.into(),
            pass: Some(ratio <= 2.0),
            note: format!(
                "{worst_cpu:.1} vs {plain_cpu:.1} µs/req; throughput {} vs {} req/s ({:.2}×){}{rounds}",
                fmt_rps(worst.throughput_rps),
                fmt_rps(plain.throughput_rps),
                worst.throughput_rps / plain.throughput_rps,
                self.repeats_note(
                    &[("g-glob-worst", "worst"), ("g-glob-plain", "plain")],
                    |r| opt(cpu(r), |v| format!("{v:.1}"))
                )
            ),
        }
    }

    /// The verified-token cache's byte budget: a fresh server whose policy has a CEL condition
    /// reading `claims` (bench/policies/claims-cel.yaml, so every cached token keeps its whole
    /// payload) receives 100 000 distinct tokens with 8 KiB of claims each (row rss-8k-fill), and
    /// another, the same policy with the cache off (bench/policies/claims-cel-nocache.yaml, row
    /// rss-8k-nocache), the same tokens. The first one's RSS growth minus the second's is what the
    /// cache holds, beside the server's own working set for such requests (their buffers, the
    /// allocator's caches); it may be at most `limits.token_cache_bytes` (the default, 128 MiB).
    fn cache_budget_target(&self) -> Target {
        const BUDGET_MIB: f64 = 128.0;
        const TOKENS: u64 = 100_000;
        let name = "memory of 100 000 cached tokens of 8 KiB claims (RSS growth with the cache \
                    minus without) ≤ token_cache_bytes (128 MiB)";
        let limit = "≤ 128 MiB";
        let (
            Some(start),
            Some(filled),
            Some(fill),
            Some(bare_start),
            Some(bare_filled),
            Some(bare),
        ) = (
            self.memory_point("stepgate-8k-start"),
            self.memory_point("stepgate-8k-fill"),
            self.run("rss-8k-fill"),
            self.memory_point("stepgate-8k-nocache-start"),
            self.memory_point("stepgate-8k-nocache-fill"),
            self.run("rss-8k-nocache"),
        )
        else {
            return Target::missing(
                name,
                limit,
                "rows rss-8k-fill and rss-8k-nocache and their memory points",
            );
        };
        if let Some(t) = Target::invalid(name, limit.into(), &[fill, bare]) {
            return t;
        }
        let growth = filled.rss_mib - start.rss_mib;
        let working_set = bare_filled.rss_mib - bare_start.rss_mib;
        let cache = growth - working_set;
        let sent = fill.generator.sent_total.min(bare.generator.sent_total);
        let claims_mib = sent as f64 * RSS_8K_CLAIM_BYTES as f64 / (1024.0 * 1024.0);
        let mut note = format!(
            "with the cache {:.1} → {:.1} MiB ({growth:+.1}), without it {:.1} → {:.1} MiB \
             ({working_set:+.1}) after {sent} distinct tokens; kept whole without a budget, their \
             claims alone would take ≥ {claims_mib:.0} MiB ({sent} × {} B)",
            start.rss_mib,
            filled.rss_mib,
            bare_start.rss_mib,
            bare_filled.rss_mib,
            RSS_8K_CLAIM_BYTES
        );
        if let Some(gauges) = filled.token_cache {
            let _ = write!(
                note,
                "; the cache then held {} tokens, {:.1} MiB by its own estimate ({} evicted)",
                gauges.entries, gauges.mib, gauges.evicted
            );
        }
        if sent < TOKENS {
            return Target {
                name: name.into(),
                measured: format!("{cache:+.1} MiB"),
                limit: limit.into(),
                pass: None,
                note: format!(
                    "not comparable: {sent} tokens sent, fewer than {TOKENS} (BENCH_DISTINCT); {note}"
                ),
            };
        }
        Target {
            name: name.into(),
            measured: format!("{cache:+.1} MiB"),
            limit: limit.into(),
            pass: Some(cache <= BUDGET_MIB),
            note,
        }
    }

    /// (b): stepgate's CPU per request when every token is new, against the floor's plus 1.3
    /// signature verifies.
    fn uncached_target(&self, empty: Option<&RunReport>) -> Target {
        let name = "(b) uncached RS256 CPU/req ≤ empty CPU/req + 1.3 × one RSA-2048 verify";
        let cpu = |r: Option<&RunReport>| r.and_then(|r| r.server).map(|s| s.cpu_us_per_request);
        let b_rs256 = self.judged("b-rs256");
        let (Some(b), Some(e), Some(v)) = (cpu(b_rs256.as_ref()), cpu(empty), self.verify("RS256"))
        else {
            return Target::missing(name, "—", "rows b-rs256 and empty, or the RS256 verify");
        };
        let limit = e + 1.3 * v.us_per_verify;
        let rows: Vec<&RunReport> = b_rs256.iter().chain(empty).collect();
        if let Some(t) = Target::invalid(name, format!("≤ {limit:.1} µs"), &rows) {
            return t;
        }
        let mut note = format!(
            "empty {e:.1} µs + 1.3 × {:.1} µs; stepgate's cost above the floor is {:.2} verifies{}",
            v.us_per_verify,
            (b - e) / v.us_per_verify,
            self.repeats_note(&[("b-rs256", "stepgate"), ("empty", "empty")], |r| {
                opt(r.server.map(|s| s.cpu_us_per_request), |v| {
                    format!("{v:.1}")
                })
            })
        );
        if let Some(busy) = cpu(self.judged("empty-busy").as_ref()) {
            let _ = write!(
                note,
                "; the empty server busy one verify per Check costs {busy:.1} µs, so {:.1} µs of \
                 that is the transport at the lower rate and {:.1} µs stepgate's own",
                busy - e - v.us_per_verify,
                b - busy
            );
        }
        Target {
            name: name.into(),
            measured: format!("{b:.1} µs"),
            limit: format!("≤ {limit:.1} µs"),
            pass: Some(b <= limit),
            note,
        }
    }

    /// stepgate's cached-token row against Cerbos's with the same token (Cerbos's default
    /// verified-JWT cache helps it the same way), both closed loop at the same pinning.
    fn cerbos_targets(&self, a: Option<&RunReport>, out: &mut Vec<Target>) {
        const WHAT: &str = "stepgate (a) vs Cerbos (its default JWT cache)";
        let cerbos = self.judged("cerbos-a");
        let pair = a.zip(cerbos.as_ref());
        let cpu = |r: &RunReport| r.server.map(|s| s.cpu_us_per_request);

        let name = format!("{WHAT}: throughput ≥ 10 × Cerbos's");
        match pair {
            Some((a, c)) if c.throughput_rps > 0.0 => {
                let invalid = Target::invalid(&name, "≥ 10×".into(), &[a, c]);
                out.push(invalid.unwrap_or_else(|| {
                    let ratio = a.throughput_rps / c.throughput_rps;
                    let mut note =
                        self.throughput_note([("a", "stepgate", a), ("cerbos-a", "Cerbos", c)]);
                    if let Some(busy) = a.server.map(|s| s.cpu_utilization)
                        && busy < 0.9
                    {
                        let _ = write!(
                            note,
                            "; stepgate used only {:.0} % of its core (the generator set the pace), \
                             so this ratio understates it — compare CPU µs/req",
                            busy * 100.0
                        );
                    }
                    Target {
                        name: name.clone(),
                        measured: format!("{ratio:.1}×"),
                        limit: "≥ 10×".into(),
                        pass: Some(ratio >= 10.0),
                        note,
                    }
                }));
            }
            _ => out.push(Target::missing(&name, "≥ 10×", "rows a and cerbos-a")),
        }

        let name = format!("{WHAT}: CPU per request ≤ 1/10 of Cerbos's");
        match pair.and_then(|(a, c)| Some((a, c, cpu(a)?, cpu(c)?))) {
            Some((a, c, a_cpu, c_cpu)) if a_cpu > 0.0 => {
                let limit = c_cpu / 10.0;
                let invalid = Target::invalid(&name, format!("≤ {limit:.1} µs"), &[a, c]);
                out.push(invalid.unwrap_or_else(|| Target {
                    name: name.clone(),
                    measured: format!("{a_cpu:.1} µs"),
                    limit: format!("≤ {limit:.1} µs"),
                    pass: Some(a_cpu <= limit),
                    note: format!(
                        "Cerbos {c_cpu:.1} µs/req: stepgate uses 1/{:.1} of it{}",
                        c_cpu / a_cpu,
                        self.repeats_note(&[("a", "stepgate"), ("cerbos-a", "Cerbos")], |r| {
                            opt(cpu(r), |v| format!("{v:.1}"))
                        })
                    ),
                }));
            }
            _ => out.push(Target::missing(
                &name,
                "—",
                "server CPU of rows a and cerbos-a",
            )),
        }

        let name = format!("{WHAT}: lower p99");
        match pair {
            Some((a, c)) => {
                let limit = format!("< {} ms", fmt_ms(c.latency_ms.p99));
                let invalid = Target::invalid(&name, limit.clone(), &[a, c]);
                out.push(invalid.unwrap_or_else(|| Target {
                    name: name.clone(),
                    measured: format!("{} ms", fmt_ms(a.latency_ms.p99)),
                    limit,
                    pass: Some(a.latency_ms.p99 < c.latency_ms.p99),
                    note: format!(
                        "closed loop, {} in flight each: at each server's own maximum (p50 {} vs {} ms){}",
                        a.concurrency,
                        fmt_ms(a.latency_ms.p50),
                        fmt_ms(c.latency_ms.p50),
                        self.repeats_note(&[("a", "stepgate"), ("cerbos-a", "Cerbos")], |r| {
                            fmt_ms(r.latency_ms.p99)
                        })
                    ),
                }));
            }
            None => out.push(Target::missing(&name, "—", "rows a and cerbos-a")),
        }
    }

    /// What asking stepgate adds to a request through Envoy: the same open-loop rate through
    /// Envoy without and with the ext_authz filter.
    fn envoy_targets(&self, out: &mut Vec<Target>) {
        let (only, with) = (self.judged("f-envoy-only"), self.judged("f-envoy-stepgate"));
        let pair = only.as_ref().zip(with.as_ref());
        let empty = self.judged("f-envoy-empty").filter(|e| e.errors == 0);
        for (quantile, limit_ms) in [("p50", 0.25), ("p99", 1.0)] {
            let name = format!(
                "(f) latency Envoy adds with stepgate vs without, open loop: {quantile} ≤ +{limit_ms} ms"
            );
            let limit = format!("≤ +{limit_ms:.2} ms");
            let Some((only, with)) = pair else {
                out.push(Target::missing(
                    &name,
                    &limit,
                    "rows f-envoy-only and f-envoy-stepgate",
                ));
                continue;
            };
            if let Some(t) = Target::invalid(&name, limit.clone(), &[only, with]) {
                out.push(t);
                continue;
            }
            let pick = |r: &RunReport| match quantile {
                "p50" => r.latency_ms.p50,
                _ => r.latency_ms.p99,
            };
            let rows = [
                ("f-envoy-stepgate", "with"),
                ("f-envoy-only", "without"),
                ("f-envoy-empty", "empty server"),
            ];
            let repeats = self.repeats_note(&rows, |r| fmt_ms(pick(r)));
            let (added, rounds) = self.per_round(
                ("f-envoy-stepgate", "f-envoy-only"),
                |with, only| Some(pick(with) - pick(only)),
                pick(with) - pick(only),
                |v| format!("{v:+.3} ms"),
            );
            let mut note = format!(
                "{} ms with vs {} ms without, at {} req/s",
                fmt_ms(pick(with)),
                fmt_ms(pick(only)),
                fmt_rps(with.rate.unwrap_or(with.throughput_rps))
            );
            if only.rate != with.rate {
                let _ = write!(note, "; the two rows ran at different rates");
            }
            if let Some(empty) = &empty {
                let _ = write!(
                    note,
                    "; with the empty ext_authz server instead of stepgate {} ms, so the ext_authz \
                     call itself adds {:+.3} ms and stepgate's decision {:+.3} ms",
                    fmt_ms(pick(empty)),
                    pick(empty) - pick(only),
                    pick(with) - pick(empty)
                );
            }
            note.push_str(&repeats);
            note.push_str(&rounds);
            if only.generator.fell_behind || with.generator.fell_behind {
                let _ = write!(
                    note,
                    "; the generator fell behind its schedule in one row (see Warnings)"
                );
            }
            out.push(Target {
                name,
                measured: format!("{added:+.3} ms"),
                limit,
                pass: Some(added <= limit_ms),
                note,
            });
        }
    }
}

/// A run's throughput against another's (one round of a comparison, [`Input::per_round`]).
fn throughput_ratio(row: &RunReport, base: &RunReport) -> Option<f64> {
    (base.throughput_rps > 0.0).then(|| row.throughput_rps / base.throughput_rps)
}

/// A run's server CPU per request against another's (one round, [`Input::per_round`]).
fn cpu_ratio(row: &RunReport, base: &RunReport) -> Option<f64> {
    let (row, base) = (
        row.server?.cpu_us_per_request,
        base.server?.cpu_us_per_request,
    );
    (base > 0.0).then(|| row / base)
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// When an open-loop row's rate is at or above the closed-loop maximum of the same server, the
/// server was overloaded: its queue (and latency) grew for the whole run.
fn overload_note(open: &RunReport, closed: Option<&RunReport>) -> String {
    let busy = open.server.map_or(0.0, |s| s.cpu_utilization);
    match (open.rate, closed) {
        (Some(rate), Some(c)) if rate >= c.throughput_rps * 0.95 => format!(
            "; stepgate's own max is {} req/s, so this rate overloads it (latency is queueing)",
            fmt_rps(c.throughput_rps)
        ),
        // Unbatched (open-loop) requests cost more CPU each than closed-loop ones.
        (Some(_), _) if busy >= 0.9 => format!(
            "; stepgate used {:.0} % of its core at this rate: saturated, the latency is mostly queueing",
            busy * 100.0
        ),
        _ => String::new(),
    }
}

/// The largest relative deviation of `samples` from `base` (signed), and their range.
pub fn deviation(base: f64, samples: &[f64]) -> (f64, f64, f64) {
    let lo = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (d_lo, d_hi) = ((lo - base) / base, (hi - base) / base);
    let dev = if d_hi.abs() >= d_lo.abs() { d_hi } else { d_lo };
    (dev, lo, hi)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "—".into(), f)
}

/// The whole Markdown document.
pub fn render(input: &Input) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", input.title);
    for (k, v) in &input.meta {
        let _ = writeln!(md, "- **{k}**: {v}");
    }
    if !input.verifies.is_empty() {
        let list: Vec<String> = input
            .verifies
            .iter()
            .map(|v| format!("{} {:.1} µs", v.algorithm, v.us_per_verify))
            .collect();
        let _ = writeln!(
            md,
            "- **one signature verify** (aws-lc with the key parsed once, as stepgate verifies, pinned \
             like the server): {}",
            list.join(", ")
        );
    }

    md.push_str("\n## Results\n\n");
    md.push_str(
        "Closed loop rows are maximum throughput; open loop rows are a fixed, evenly paced rate with \
         latency measured from each request's intended send time. Server CPU and RSS come from \
         `/proc` over the measured window; \"CPU %\" is the server's share of its one core (≈ 100 % \
         when the server, not the generator, is the bottleneck). \"Other CPU %\" is the CPU time of \
         every other process (kernel threads included), in % of one core (behind \
         Envoy, the upstream and the ext_authz server are counted apart, as the server's peers): a \
         few % is normal, more means the row was disturbed.\n\n",
    );
    md.push_str(
        "| scenario | server | mode | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | \
         server CPU µs/req | server CPU % | peak RSS MiB | errors | other CPU % |\n",
    );
    md.push_str("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for r in &input.runs {
        let l = &r.latency_ms;
        let mode = match r.rate {
            Some(rate) => format!("open @{}/s", fmt_rps(rate)),
            None => format!("closed ×{}", r.concurrency),
        };
        let mut flags = String::new();
        if r.generator.in_flight_cap_hits > 0 {
            flags.push_str(" ⚠ server overloaded");
        } else if r.generator.fell_behind {
            flags.push_str(" ⚠ generator fell behind");
        }
        if r.generator.payloads_repeated && r.scenario.starts_with("b-") {
            flags.push_str(" ⚠ tokens repeated");
        }
        let _ = writeln!(
            md,
            "| {} — {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            r.label,
            r.title,
            flags,
            r.target,
            mode,
            fmt_rps(r.throughput_rps),
            fmt_ms(l.p50),
            fmt_ms(l.p90),
            fmt_ms(l.p99),
            fmt_ms(l.p999),
            fmt_ms(l.max),
            opt(r.server.map(|s| s.cpu_us_per_request), |v| format!(
                "{v:.1}"
            )),
            opt(r.server.map(|s| s.cpu_utilization), |v| format!(
                "{:.0}",
                v * 100.0
            )),
            opt(r.server.map(|s| s.peak_rss_mib), |v| format!("{v:.1}")),
            r.errors,
            r.interference.other_cpu_utilization * 100.0,
        );
    }

    if !input.memory.is_empty() {
        md.push_str("\n## Memory\n\n| point | RSS MiB | peak RSS MiB |\n|---|--:|--:|\n");
        for m in &input.memory {
            let _ = writeln!(
                md,
                "| {} | {:.1} | {:.1} |",
                m.label, m.rss_mib, m.peak_rss_mib
            );
        }
        for label in [
            "rss-100k-fill",
            "rss-100k-steady",
            "rss-8k-fill",
            "rss-8k-nocache",
        ] {
            if let Some(r) = input.run(label)
                && let Some(s) = r.server
            {
                let _ = writeln!(
                    md,
                    "| {label} (end) | {:.1} | {:.1} |",
                    s.rss_mib_after, s.peak_rss_mib
                );
            }
        }
    }

    if !input.compiles.is_empty() {
        md.push_str(
            "\n## Policies of the rule-index rows\n\nGenerated by `loadgen rules`, compiled as \
             `stepgate serve` compiles them (parse, patterns, index).\n\n\
             | rules | policy KiB | compile ms | index (`stepgate check`) |\n|--:|--:|--:|---|\n",
        );
        for c in &input.compiles {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {} |",
                c.rules,
                c.bytes / 1024,
                c.compile_ms,
                c.index
            );
        }
    }

    if !input.replays.is_empty() {
        md.push_str(
            "\n## Replay\n\n`stepgate replay --json` of generated decision records (`loadgen records`: \
             a week of mixed traffic decided by the demo policy), pinned to the server's core.\n\n\
             | row | records | changed | wall s | CPU s | records/s | records per CPU s | peak RSS MiB |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for r in &input.replays {
            let _ = writeln!(
                md,
                "| {} — {} | {} | {} | {:.2} | {:.2} | {} | {} | {:.1} |",
                r.label,
                r.title,
                r.records,
                r.changed,
                r.wall_seconds,
                r.cpu_seconds,
                fmt_rps(r.records_per_second),
                fmt_rps(r.records_per_cpu_second),
                r.peak_rss_mib
            );
        }
    }

    md.push_str(
        "\n## Targets\n\n| target | measured | limit | result | note |\n|---|--:|--:|---|---|\n",
    );
    for t in input.targets() {
        let _ = writeln!(
            md,
            "| {} | {} | {} | **{}** | {} |",
            t.name,
            t.measured,
            t.limit,
            t.verdict(),
            t.note
        );
    }

    let pairs: Vec<(&RunReport, &RunReport)> = [
        ("empty-open", "a-open"),
        ("empty-open-half-a", "a-open-half-a"),
        ("canned-open-20k", "a-open-20k"),
    ]
    .iter()
    .flat_map(|(e, a)| input.runs_of(e).into_iter().zip(input.runs_of(a)))
    .collect();
    if !pairs.is_empty() {
        md.push_str(
            "\n## Open-loop latency against a floor at the same rate\n\n\
             | floor | rate req/s | floor p50 ms | stepgate p50 ms | p50 difference ms | floor p99 ms | stepgate p99 ms | p99 ratio | stepgate CPU % |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for (e, a) in pairs {
            let floor = if e.label.starts_with("canned") {
                "canned"
            } else {
                "empty"
            };
            let _ = writeln!(
                md,
                "| {floor} | {} | {} | {} | {:+.3} | {} | {} | {:.2}× | {} |",
                fmt_rps(a.rate.unwrap_or_default()),
                fmt_ms(e.latency_ms.p50),
                fmt_ms(a.latency_ms.p50),
                a.latency_ms.p50 - e.latency_ms.p50,
                fmt_ms(e.latency_ms.p99),
                fmt_ms(a.latency_ms.p99),
                a.latency_ms.p99 / e.latency_ms.p99.max(1e-9),
                opt(a.server.map(|s| s.cpu_utilization), |v| format!(
                    "{:.0}",
                    v * 100.0
                )),
            );
        }
    }

    let (only, with) = (
        input.judged("f-envoy-only"),
        input.judged("f-envoy-stepgate"),
    );
    if let (Some(only), Some(with)) = (&only, &with) {
        md.push_str(
            "\n## HTTP through Envoy, without and with stepgate (ext_authz)\n\n\
             Open loop, the same rate and token; latency from each request's intended send time, \
             measured by the client (Envoy, then the upstream).",
        );
        let runs = input.runs_of("f-envoy-stepgate").len();
        if runs > 1 {
            let _ = write!(
                md,
                " Each figure is the median of the {runs} alternating runs of its row (the Results \
                 table lists every run)."
            );
        }
        md.push_str(
            "\n\n\
             | rate req/s | | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | Envoy CPU µs/req | upstream + ext_authz server CPU µs/req |\n\
             |--:|---|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        let line = |md: &mut String, what: &str, r: &RunReport| {
            let l = &r.latency_ms;
            let _ = writeln!(
                md,
                "| {} | {what} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_rps(r.rate.unwrap_or(r.throughput_rps)),
                fmt_ms(l.p50),
                fmt_ms(l.p90),
                fmt_ms(l.p99),
                fmt_ms(l.p999),
                fmt_ms(l.max),
                opt(r.server.map(|s| s.cpu_us_per_request), |v| format!(
                    "{v:.1}"
                )),
                if r.requests > 0 && r.interference.peers_cpu_seconds > 0.0 {
                    format!(
                        "{:.1}",
                        r.interference.peers_cpu_seconds * 1e6 / r.requests as f64
                    )
                } else {
                    "—".into()
                },
            );
        };
        line(&mut md, "Envoy only", only);
        let empty = input.judged("f-envoy-empty");
        if let Some(empty) = &empty {
            line(
                &mut md,
                "Envoy + empty ext_authz server (diagnostic)",
                empty,
            );
        }
        line(&mut md, "Envoy + stepgate", with);
        let added = |md: &mut String, what: &str, a: &Percentiles, b: &Percentiles| {
            let _ = writeln!(
                md,
                "| | **{what}** | {:+.3} | {:+.3} | {:+.3} | {:+.3} | | | |",
                b.p50 - a.p50,
                b.p90 - a.p90,
                b.p99 - a.p99,
                b.p999 - a.p999,
            );
        };
        added(
            &mut md,
            "added by stepgate",
            &only.latency_ms,
            &with.latency_ms,
        );
        if let Some(empty) = &empty {
            added(
                &mut md,
                "added by the ext_authz call itself (empty server)",
                &only.latency_ms,
                &empty.latency_ms,
            );
            added(
                &mut md,
                "stepgate over the empty server",
                &empty.latency_ms,
                &with.latency_ms,
            );
        }
    }

    if let Some(empty) = input.judged("empty") {
        md.push_str(
            "\n## Ratios against the empty server\n\nThroughput as a share of the empty server's \
             closed-loop maximum; CPU per request as a multiple of the empty server's, and the \
             decision's own cost (CPU µs/req above the empty server's), also counted in RS256 \
             verifies. A repeated row is compared by its medians.\n\n| scenario | req/s ratio | CPU/req ratio | decision cost µs/req | in RS256 verifies |\n|---|--:|--:|--:|--:|\n",
        );
        let e_cpu = empty.server.map(|s| s.cpu_us_per_request);
        let verify = input.verify("RS256").map(|v| v.us_per_verify);
        let mut labels: Vec<&str> = Vec::new();
        for r in input.runs.iter().filter(|r| r.rate.is_none()) {
            if r.label != "empty" && !labels.contains(&r.label.as_str()) {
                labels.push(&r.label);
            }
        }
        for r in labels.iter().filter_map(|l| input.judged(l)) {
            let cpu = r.server.map(|s| s.cpu_us_per_request);
            let extra = cpu.zip(e_cpu).map(|(c, e)| c - e);
            let runs = input.runs_of(&r.label).len();
            let _ = writeln!(
                md,
                "| {}{} | {} | {} | {} | {} |",
                r.label,
                if runs > 1 {
                    format!(" (median of {runs})")
                } else {
                    String::new()
                },
                if empty.throughput_rps > 0.0 {
                    format!("{:.3}", r.throughput_rps / empty.throughput_rps)
                } else {
                    "—".into()
                },
                opt(cpu.zip(e_cpu).map(|(c, e)| c / e), |v| format!("{v:.2}×")),
                opt(extra, |v| format!("{v:.1}")),
                opt(extra.zip(verify).map(|(x, v)| x / v), |v| format!("{v:.2}")),
            );
        }
    }

    let mut warnings = Vec::new();
    for r in &input.runs {
        if r.errors > 0 {
            warnings.push(format!(
                "{}: {} errors (wrong or failed answers) — its numbers do not count. First: {}",
                r.label,
                r.errors,
                r.error_samples.first().map_or("", String::as_str)
            ));
        }
        if r.generator.in_flight_cap_hits > 0 {
            warnings.push(format!(
                "{}: the server fell behind the schedule: {} requests were unanswered at once (the \
                 cap), so sends waited ({} due requests never sent, send lag p99 {} ms); latencies \
                 still count from the intended send times",
                r.label,
                r.generator.max_in_flight,
                r.generator.unsent,
                fmt_ms(r.generator.send_lag_p99_ms),
            ));
        } else if r.generator.fell_behind {
            warnings.push(format!(
                "{}: the generator fell behind its schedule (send lag p99 {} ms, max {} ms, {} unsent): \
                 part of the latency is the generator's",
                r.label,
                fmt_ms(r.generator.send_lag_p99_ms),
                fmt_ms(r.generator.send_lag_max_ms),
                r.generator.unsent,
            ));
        }
        if r.interference.other_cpu_utilization > OTHER_CPU_WARNING
            || r.interference.steal_seconds > 0.02 * r.seconds
        {
            warnings.push(format!(
                "{}: something else used {:.0} % of a core during the window (hypervisor steal {:.2} s): \
                 the row was disturbed; run again on a quiet machine",
                r.label,
                r.interference.other_cpu_utilization * 100.0,
                r.interference.steal_seconds
            ));
        }
        if r.generator.payloads_repeated && r.scenario.starts_with("b-") {
            warnings.push(format!(
                "{}: sent {} requests with {} distinct payloads, so tokens repeated and the cache \
                 may have helped",
                r.label, r.generator.sent_total, r.generator.distinct_payloads
            ));
        }
    }
    if !warnings.is_empty() {
        md.push_str("\n## Warnings\n\n");
        for w in warnings {
            let _ = writeln!(md, "- {w}");
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Percentiles, ServerCost};

    fn run(label: &str, rps: f64, cpu_us: f64, p50: f64, p99: f64) -> RunReport {
        RunReport {
            label: label.into(),
            title: label.into(),
            throughput_rps: rps,
            requests: (rps * 10.0) as u64,
            seconds: 10.0,
            concurrency: 32,
            latency_ms: Percentiles {
                p50,
                p99,
                ..Default::default()
            },
            server: Some(ServerCost {
                cpu_us_per_request: cpu_us,
                cpu_utilization: 0.99,
                rss_mib_after: 40.0,
                peak_rss_mib: 41.0,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn input() -> Input {
        let mut a_open = run("a-open", 20_000.0, 30.0, 0.110, 0.50);
        a_open.rate = Some(20_000.0);
        let mut e_open = run("empty-open", 20_000.0, 20.0, 0.080, 0.40);
        e_open.rate = Some(20_000.0);
        let mut steady = run("rss-100k-steady", 30_000.0, 30.0, 1.0, 2.0);
        steady.rss_samples_mib = vec![40.0, 41.0, 39.5];
        Input {
            title: "t".into(),
            meta: vec![("commit".into(), "abc".into())],
            runs: vec![
                run("empty", 40_000.0, 24.0, 0.8, 1.5),
                run("a", 35_000.0, 28.0, 0.9, 1.7),
                run("b-rs256", 15_000.0, 60.0, 2.0, 3.0),
                e_open,
                a_open,
                run("rss-100k-fill", 15_000.0, 60.0, 2.0, 3.0),
                steady,
            ],
            verifies: vec![VerifyCost {
                algorithm: "RS256".into(),
                iterations: 64,
                seconds: 1.0,
                us_per_verify: 25.0,
            }],
            memory: vec![MemPoint {
                label: "stepgate-start".into(),
                rss_mib: 12.0,
                peak_rss_mib: 12.5,
                token_cache: None,
            }],
            replays: Vec::new(),
            compiles: Vec::new(),
        }
    }

    #[test]
    fn targets_are_computed_from_the_rows() {
        let targets = input().targets();
        let verdicts: Vec<_> = targets.iter().map(|t| t.verdict()).collect();
        // 35k/40k = 0.875 ≥ 0.85; p50 0.110 ≤ 0.130; p99 0.50 ≤ 0.50; 60 ≤ 24 + 32.5;
        // 12 ≤ 32; 40 ≤ 96; (41-40)/40 = 2.5 % within 5 %; no Cerbos, Envoy, glob, 8 KiB,
        // traced, blocks, risk, records or replay rows.
        assert_eq!(
            verdicts,
            [
                "PASS", "PASS", "PASS", "MISS", "PASS", "PASS", "PASS", "n/a", "n/a", "n/a", "n/a",
                "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a",
                "n/a", "n/a", "n/a", "n/a", "n/a"
            ]
        );
        assert_eq!(targets[0].measured, "0.875×");
        assert_eq!(targets[3].limit, "≤ 56.5 µs");
        assert_eq!(targets[6].measured, "+2.5 %");
    }

    #[test]
    fn the_traced_and_blocks_rows_are_judged_against_the_empty_server() {
        for (label, prefix) in [
            ("a-traced", "(traces)"),
            ("a-blocks", "(risk) cached Check, 1000"),
            ("a-risk", "(risk) cached Check, risk signals on (in"),
        ] {
            let mut i = input();
            i.runs.push(run(label, 33_000.0, 29.0, 0.9, 1.7));
            let target = |i: &Input| {
                i.targets()
                    .into_iter()
                    .find(|t| t.name.starts_with(prefix))
                    .unwrap()
            };
            let judged = target(&i);
            assert_eq!(
                (judged.measured.as_str(), judged.pass),
                ("0.825×", Some(true))
            );
            i.runs.last_mut().unwrap().throughput_rps = 31_000.0;
            assert_eq!(target(&i).pass, Some(false), "{label}: 0.775 < 0.80");
        }
    }

    #[test]
    fn the_canned_floor_judges_throughput_and_paced_latency() {
        let mut i = input();
        i.runs.push(run("canned", 38_000.0, 20.0, 0.7, 1.2));
        for (label, p50, p99) in [
            ("canned-open-20k", 0.100, 0.40),
            ("a-open-20k", 0.140, 0.55),
        ] {
            let mut r = run(label, 20_000.0, 25.0, p50, p99);
            r.rate = Some(20_000.0);
            i.runs.push(r);
        }
        let targets = i.targets();
        let floor = target(&targets, "(floor) cached Check")[0];
        // a: 35 000 req/s, 28 µs against 38 000 and 20 µs.
        assert_eq!(
            (floor.measured.as_str(), floor.pass),
            ("0.921×", Some(true))
        );
        assert!(
            floor.note.contains("28.0 vs 20.0 µs/req (1.40×)"),
            "{}",
            floor.note
        );
        assert!(!floor.note.contains("canned-hyper"), "{}", floor.note);
        i.runs.push(run("canned-hyper", 36_000.0, 21.5, 0.7, 1.2));
        let with_hyper = i.targets();
        let note = &target(&with_hyper, "(floor) cached Check")[0].note;
        assert!(
            note.contains(
                "through hyper's server (canned-hyper): 21.5 µs/req (1.07× the canned floor's)"
            ),
            "{note}"
        );
        let open = target(&targets, "(floor) open loop at 20 000 req/s");
        assert_eq!(open.len(), 2);
        // p50 0.140 against 0.100; p99 0.55 against 0.40.
        assert_eq!(
            (
                open[0].measured.as_str(),
                open[0].limit.as_str(),
                open[0].pass
            ),
            ("+0.040 ms", "≤ +0.050 ms", Some(true))
        );
        assert_eq!(
            (
                open[1].measured.as_str(),
                open[1].limit.as_str(),
                open[1].pass
            ),
            ("1.38×", "≤ 1.25×", Some(false))
        );
        assert!(
            open[1]
                .note
                .starts_with("stepgate 0.550 ms, canned 0.400 ms at 20,000 req/s"),
            "{}",
            open[1].note
        );
    }

    /// Rounds that ran in different stretches of the machine: the floor's second run was fast
    /// and its third slow, so its median comes from another minute than stepgate's. Judged round
    /// by round, each stepgate run against the floor run beside it.
    #[test]
    fn repeated_rows_are_judged_round_by_round() {
        let mut i = input();
        for (canned, a) in [
            (76_030.0, 69_705.0),
            (78_272.0, 57_822.0),
            (61_009.0, 56_860.0),
        ] {
            i.runs.push(run("canned", canned, 13.0, 0.7, 1.2));
            i.runs.push(run("a-round", a, 14.0, 0.9, 1.7));
        }
        for r in i.runs.iter_mut().filter(|r| r.label == "a-round") {
            r.label = "a".into();
        }
        i.runs
            .retain(|r| r.label != "a" || r.throughput_rps != 35_000.0);
        let targets = i.targets();
        let floor = target(&targets, "(floor) cached Check")[0];
        // Rounds: 0.917, 0.739, 0.932; the medians: 57 822 / 76 030 = 0.761.
        assert_eq!(
            (floor.measured.as_str(), floor.pass),
            ("0.917×", Some(true))
        );
        assert!(
            floor.note.contains(
                "judged round by round: the median of 3 rounds (0.917×, 0.739×, 0.932×), \
                 where the medians give 0.761×"
            ),
            "{}",
            floor.note
        );
        // Rows of different round counts cannot be paired: judged on the medians.
        i.runs.push(run("canned", 90_000.0, 13.0, 0.7, 1.2));
        let targets = i.targets();
        let floor = target(&targets, "(floor) cached Check")[0];
        assert_eq!(
            floor.measured, "0.749×",
            "57 822 / 77 151, the median of four"
        );
        assert!(!floor.note.contains("round by round"), "{}", floor.note);
    }

    #[test]
    fn the_log_cost_is_judged_against_no_decision_line() {
        let mut i = input();
        i.runs.push(run("a-quiet", 36_000.0, 27.0, 0.8, 1.5));
        i.runs.push(run("a-log-all", 33_000.0, 31.0, 0.8, 1.5));
        let t = i
            .targets()
            .into_iter()
            .find(|t| t.name.starts_with("(log)"))
            .unwrap();
        // a: 28 µs against 27.
        assert_eq!((t.measured.as_str(), t.pass), ("1.037×", Some(true)));
        assert!(
            t.note
                .contains("every decision logged (a-log-all): 31.0 µs/req (1.15×)"),
            "{}",
            t.note
        );
        i.runs.retain(|r| r.label != "a-quiet");
        i.runs.push(run("a-quiet", 36_000.0, 26.0, 0.8, 1.5));
        assert_eq!(
            i.targets()
                .into_iter()
                .find(|t| t.name.starts_with("(log)"))
                .unwrap()
                .pass,
            Some(false)
        );
    }

    #[test]
    fn the_rule_index_rows_are_judged_on_cpu_per_request() {
        let mut i = input();
        i.runs.push(run("rules-1", 40_000.0, 25.0, 0.8, 1.5));
        i.runs.push(run("rules-1000", 38_000.0, 29.0, 0.8, 1.5));
        i.runs.push(run("rules-10000", 30_000.0, 40.0, 0.8, 1.5));
        i.compiles.push(RulesPolicy {
            rules: 10_000,
            bytes: 1 << 20,
            compile_ms: 250.0,
            index: "x".into(),
        });
        let targets = i.targets();
        let find = |prefix: &str| targets.iter().find(|t| t.name.starts_with(prefix)).unwrap();
        let thousand = find("(index) 1000 rules");
        assert_eq!(
            (thousand.measured.as_str(), thousand.pass),
            ("1.16×", Some(true))
        );
        let ten_thousand = find("(index) 10000 rules");
        assert_eq!(
            (ten_thousand.measured.as_str(), ten_thousand.pass),
            ("1.60×", Some(false))
        );
        assert!(
            ten_thousand.note.contains("compiled in 250 ms"),
            "{}",
            ten_thousand.note
        );
    }

    #[test]
    fn replay_is_judged_on_the_median_of_its_runs() {
        let replay = |label: &str, per_second: f64| ReplayRun {
            label: label.into(),
            title: "t".into(),
            records: 1_000_000,
            changed: 135_000,
            wall_seconds: 1e6 / per_second,
            cpu_seconds: 1e6 / per_second,
            peak_rss_mib: 20.0,
            records_per_second: per_second,
            records_per_cpu_second: per_second,
        };
        let mut i = input();
        i.replays = vec![
            replay("replay", 150_000.0),
            replay("replay", 240_000.0),
            replay("replay-baseline", 170_000.0),
            replay("replay", 210_000.0),
        ];
        let target = |i: &Input| {
            i.targets()
                .into_iter()
                .find(|t| t.name.starts_with("(replay)"))
                .unwrap()
        };
        let judged = target(&i);
        assert_eq!(judged.pass, Some(true), "{judged:?}");
        assert_eq!(judged.measured, format!("{}/s", fmt_rps(210_000.0)));
        assert!(judged.note.contains("with --baseline"), "{}", judged.note);
        i.replays[2].label = "replay".into();
        assert_eq!(
            target(&i).pass,
            Some(false),
            "the median of 150k, 170k, 210k, 240k"
        );
        assert!(render(&i).contains("## Replay"));
    }

    #[test]
    fn missing_rows_are_not_measured_rather_than_passed() {
        let targets = Input::default().targets();
        assert!(targets.iter().all(|t| t.pass.is_none()));
    }

    #[test]
    fn an_unsaturated_baseline_is_called_out() {
        let mut i = input();
        i.runs[0].server.as_mut().unwrap().cpu_utilization = 0.6;
        assert!(i.targets()[0].note.contains("generator limited"));
    }

    #[test]
    fn the_document_has_the_table_targets_and_ratios() {
        let mut i = input();
        i.runs[1].errors = 3;
        i.runs[1].error_samples = vec!["expected OK, got code 16".into()];
        let md = render(&i);
        assert!(md.starts_with("# t\n"));
        assert!(md.contains("| a — a | "));
        assert!(md.contains("| 35,000 | 0.900 | "));
        assert!(md.contains("**MISS**"));
        assert!(md.contains("| a | 0.875 | 1.17× | 4.0 | 0.16 |"));
        assert!(md.contains("a: 3 errors"));
        assert!(md.contains("| stepgate-start | 12.0 | 12.5 |"));
    }

    #[test]
    fn a_disturbed_row_is_reported() {
        let mut i = input();
        i.runs[2].interference.other_cpu_utilization = 0.35;
        let md = render(&i);
        assert!(md.contains("b-rs256: something else used 35 % of a core"));
        assert!(!md.contains("a: something else"));
    }

    #[test]
    fn an_overloaded_server_is_not_blamed_on_the_generator() {
        let mut i = input();
        let open = i.runs.iter_mut().find(|r| r.label == "a-open").unwrap();
        open.generator.in_flight_cap_hits = 10;
        open.generator.fell_behind = true;
        open.generator.max_in_flight = 20_000;
        let md = render(&i);
        assert!(md.contains("a-open: the server fell behind the schedule: 20000 requests"));
        assert!(md.contains("⚠ server overloaded"));
        assert!(!md.contains("generator fell behind"));
    }

    fn target<'a>(targets: &'a [Target], starts: &str) -> Vec<&'a Target> {
        targets
            .iter()
            .filter(|t| t.name.starts_with(starts))
            .collect()
    }

    #[test]
    fn repeated_open_loop_runs_are_judged_by_their_medians() {
        let mut i = input();
        // input(): a-open p99 0.50, empty-open p99 0.40. Two more of each, alternating.
        for (label, p99) in [
            ("empty-open", 2.0),
            ("a-open", 0.45),
            ("empty-open", 0.38),
            ("a-open", 9.0),
        ] {
            let mut r = run(label, 20_000.0, 30.0, 0.1, p99);
            r.rate = Some(20_000.0);
            i.runs.push(r);
        }
        let targets = i.targets();
        let p99 = target(&targets, "(a) open loop at ½ empty max rate: p99")[0];
        // Rounds 0.50/0.40, 0.45/2.0 and 9.0/0.38: the median is 1.25; so is the medians' ratio,
        // stepgate 0.50 of (0.50, 0.45, 9.0) against empty 0.40 of (0.40, 2.0, 0.38).
        assert_eq!(p99.measured, "1.25×");
        assert_eq!(p99.limit, "≤ 1.25×");
        assert_eq!(p99.verdict(), "PASS");
        assert!(
            p99.note.contains(
                "the median of 3 rounds (1.25×, 0.23×, 23.68×), where the medians give 1.25×"
            ),
            "{}",
            p99.note
        );
        assert!(
            p99.note.contains(
                "medians of 3 alternating runs (stepgate 0.500, 0.450, 9.00; empty 0.400, 2.00, \
                 0.380)"
            ),
            "{}",
            p99.note
        );
        let md = render(&i);
        for pair in [
            "| 0.400 | 0.500 | 1.25× |",
            "| 2.00 | 0.450 | 0.23× |",
            "| 0.380 | 9.00 |",
        ] {
            assert!(
                md.contains(pair),
                "one line per pair, {pair} missing:\n{md}"
            );
        }
        assert_eq!(super::median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(super::median(&[]), 0.0);
    }

    #[test]
    fn repeated_closed_loop_rows_are_judged_by_their_medians() {
        let mut i = input();
        // input(): empty 40 000 req/s 24 µs, a 35 000 req/s 28 µs p99 1.7, b-rs256 60 µs.
        // Two more rounds; the second a run is slowed by 25 %, as one window on this VM can be.
        for r in [
            run("empty", 41_000.0, 23.5, 0.8, 1.4),
            run("a", 36_000.0, 27.5, 0.9, 1.6),
            run("b-rs256", 15_500.0, 58.0, 2.0, 3.0),
            run("empty", 39_000.0, 24.5, 0.8, 1.6),
            run("a", 26_000.0, 37.0, 1.2, 2.4),
            run("b-rs256", 14_000.0, 66.0, 2.0, 3.0),
        ] {
            i.runs.push(r);
        }
        i.runs.push(run("cerbos-a", 3_000.0, 300.0, 9.0, 20.0));
        let a = i.judged("a").unwrap();
        assert_eq!(a.throughput_rps, 35_000.0);
        assert_eq!(a.server.unwrap().cpu_us_per_request, 28.0);
        assert_eq!(a.latency_ms.p99, 1.7);
        assert_eq!(i.runs_of("a").len(), 3, "every run stays in the table");

        let targets = i.targets();
        let throughput = &targets[0];
        // Medians 35 000 / 40 000; the slowed run alone would have been 26/40 = 0.65.
        assert_eq!(throughput.measured, "0.875×");
        assert_eq!(throughput.verdict(), "PASS");
        assert!(
            throughput.note.contains(
                "medians of 3 alternating runs (stepgate 35,000, 36,000, 26,000; \
                 empty 40,000, 41,000, 39,000)"
            ),
            "{}",
            throughput.note
        );
        // (b): medians 60 µs and 24 µs.
        let b = target(&targets, "(b) uncached")[0];
        assert_eq!(
            (b.measured.as_str(), b.limit.as_str()),
            ("60.0 µs", "≤ 56.5 µs")
        );
        assert!(b.note.contains("stepgate 60.0, 58.0, 66.0"), "{}", b.note);
        let cerbos = target(&targets, "stepgate (a) vs Cerbos");
        assert_eq!(cerbos[0].measured, "11.7×");
        assert!(
            cerbos[0]
                .note
                .contains("(stepgate 35,000, 36,000, 26,000; Cerbos 3,000)"),
            "{}",
            cerbos[0].note
        );

        let md = render(&i);
        assert!(
            md.contains("| a (median of 3) | 0.875 | 1.17× | 4.0 | 0.16 |"),
            "{md}"
        );
        assert_eq!(md.matches("| a — a | ").count(), 3, "{md}");

        // A run that answered nothing (a failed row) voids the row rather than counting as free.
        let first_b = i.runs.iter_mut().find(|r| r.label == "b-rs256").unwrap();
        first_b.requests = 0;
        let targets = i.targets();
        let b = target(&targets, "(b) uncached")[0];
        assert_eq!(b.pass, None, "{b:?}");
        assert_eq!(b.note, "not comparable: b-rs256 answered no request");

        // A wrong answer in any run of a repeated row voids the comparisons that use it.
        let last_a = i.runs.iter_mut().rev().find(|r| r.label == "a").unwrap();
        last_a.errors = 2;
        last_a.error_samples = vec!["expected OK, got code 7".into()];
        let targets = i.targets();
        let cerbos = target(&targets, "stepgate (a) vs Cerbos");
        assert!(cerbos.iter().all(|t| t.pass.is_none()), "{cerbos:?}");
        assert!(
            cerbos[0]
                .note
                .contains("a had 2 errors (expected OK, got code 7)")
        );
    }

    #[test]
    fn repeated_envoy_rows_are_judged_by_their_medians() {
        let mut i = input();
        // Three rounds of the three rows; one window of "with" is disturbed (p99 4 ms) and one of
        // "without" (p50 0.50 ms).
        for (only, empty, with) in [
            ((0.30, 0.80), (0.50, 1.00), (0.52, 1.10)),
            ((0.50, 0.85), (0.48, 1.05), (0.50, 4.00)),
            ((0.31, 0.75), (0.51, 0.95), (0.53, 1.20)),
        ] {
            for (label, (p50, p99)) in [
                ("f-envoy-only", only),
                ("f-envoy-empty", empty),
                ("f-envoy-stepgate", with),
            ] {
                let mut r = run(label, 1_000.0, 100.0, p50, p99);
                r.rate = Some(1_000.0);
                i.runs.push(r);
            }
        }
        let targets = i.targets();
        let f = target(&targets, "(f)");
        // Round by round, p50: +0.22, 0.00, +0.22; p99: +0.30, +3.15, +0.45. (The medians would
        // give 0.52 − 0.31 = +0.21 and 1.20 − 0.80 = +0.40.)
        assert_eq!(f[0].measured, "+0.220 ms");
        assert_eq!(f[1].measured, "+0.450 ms");
        assert!(
            f[1].note
                .contains("(+0.300 ms, +3.150 ms, +0.450 ms), where the medians give +0.400 ms"),
            "{}",
            f[1].note
        );
        assert_eq!((f[0].verdict(), f[1].verdict()), ("PASS", "PASS"));
        assert!(
            f[1].note.contains(
                "medians of 3 alternating runs (with 1.10, 4.00, 1.20; without 0.800, 0.850, \
                 0.750; empty server 1.00, 1.05, 0.950)"
            ),
            "{}",
            f[1].note
        );
        for r in i.runs.iter_mut().filter(|r| r.label == "f-envoy-stepgate") {
            // 10 000 requests: the upstream and stepgate used 0.9 s of CPU, 90 µs each.
            r.interference.peers_cpu_seconds = 0.9;
        }
        let md = render(&i);
        assert!(
            md.contains(
                "| Envoy + stepgate | 0.520 | 0.000 | 1.20 | 0.000 | 0.000 | 100.0 | 90.0 |"
            ),
            "{md}"
        );
        assert!(md.contains("Each figure is the median of the 3 alternating runs"));
        assert!(md.contains("| | **added by stepgate** | +0.210 |"), "{md}");
    }

    #[test]
    fn the_busy_empty_server_splits_the_uncached_cost() {
        let mut i = input();
        let note = |i: &Input| target(&i.targets(), "(b) uncached")[0].note.clone();
        assert!(!note(&i).contains("busy"), "no empty-busy row, no split");
        // empty 24, verify 25, busy 52: 3 µs transport; b 60: 8 µs stepgate's own.
        i.runs.push(run("empty-busy", 16_000.0, 52.0, 2.0, 3.0));
        assert!(
            note(&i).ends_with(
                "the empty server busy one verify per Check costs 52.0 µs, so 3.0 µs of that \
                 is the transport at the lower rate and 8.0 µs stepgate's own"
            ),
            "{}",
            note(&i)
        );
    }

    #[test]
    fn stepgate_is_compared_with_cerbos() {
        let mut i = input();
        // a: 35 000 req/s, 28 µs/req, p99 1.7 ms.
        i.runs.push(run("cerbos-a", 3_000.0, 300.0, 9.0, 20.0));
        let targets = i.targets();
        let cerbos = target(&targets, "stepgate (a) vs Cerbos");
        let verdicts: Vec<_> = cerbos.iter().map(|t| t.verdict()).collect();
        // 35k/3k = 11.7 ≥ 10; 28 ≤ 300/10; 1.7 < 20.
        assert_eq!(verdicts, ["PASS", "PASS", "PASS"]);
        assert_eq!(cerbos[0].measured, "11.7×");
        assert_eq!(cerbos[1].limit, "≤ 30.0 µs");
        assert!(cerbos[1].note.contains("1/10.7"), "{}", cerbos[1].note);
        assert_eq!(cerbos[2].limit, "< 20.0 ms");

        // A faster, leaner Cerbos: 35k/4k = 8.75 < 10; 28 > 250/10; p99 1.7 ≥ 1.5.
        let c = i.runs.iter_mut().find(|r| r.label == "cerbos-a").unwrap();
        *c = run("cerbos-a", 4_000.0, 250.0, 0.9, 1.5);
        let targets = i.targets();
        let verdicts: Vec<_> = target(&targets, "stepgate (a) vs Cerbos")
            .iter()
            .map(|t| t.verdict())
            .collect();
        assert_eq!(verdicts, ["MISS", "MISS", "MISS"]);

        // When the generator, not stepgate, set the pace, the throughput ratio says so.
        let a = i.runs.iter_mut().find(|r| r.label == "a").unwrap();
        a.server.as_mut().unwrap().cpu_utilization = 0.5;
        let note = &i.targets()[7].note;
        assert!(
            note.ends_with(
                "stepgate used only 50 % of its core (the generator set the pace), so \
             this ratio understates it — compare CPU µs/req"
            ),
            "{note}"
        );
    }

    #[test]
    fn a_cerbos_row_with_wrong_answers_does_not_count() {
        let mut i = input();
        let mut c = run("cerbos-a", 3_000.0, 300.0, 9.0, 20.0);
        c.errors = 12;
        c.error_samples = vec!["expected EFFECT_ALLOW for read, got EFFECT_DENY".into()];
        i.runs.push(c);
        let targets = i.targets();
        let cerbos = target(&targets, "stepgate (a) vs Cerbos");
        assert_eq!(cerbos.len(), 3);
        for t in cerbos {
            assert_eq!(t.pass, None, "{t:?}");
            assert!(
                t.note
                    .contains("cerbos-a had 12 errors (expected EFFECT_ALLOW")
            );
        }
    }

    #[test]
    fn envoy_latency_is_the_difference_of_the_two_rows() {
        let mut i = input();
        let mut only = run("f-envoy-only", 1_000.0, 90.0, 0.30, 0.80);
        only.rate = Some(1_000.0);
        let mut with = run("f-envoy-stepgate", 1_000.0, 120.0, 0.45, 2.0);
        with.rate = Some(1_000.0);
        i.runs.push(only);
        i.runs.push(with);
        let targets = i.targets();
        let f = target(&targets, "(f)");
        assert_eq!(f.len(), 2);
        // p50 +0.15 ≤ 0.25; p99 +1.2 > 1.
        assert_eq!((f[0].verdict(), f[1].verdict()), ("PASS", "MISS"));
        assert_eq!(f[0].measured, "+0.150 ms");
        assert_eq!(f[1].measured, "+1.200 ms");
        assert_eq!(f[1].limit, "≤ +1.00 ms");
        assert!(f[0].note.contains("at 1,000 req/s"), "{}", f[0].note);
        let md = render(&i);
        assert!(md.contains("## HTTP through Envoy, without and with stepgate"));
        assert!(md.contains("| 1,000 | Envoy + stepgate | 0.450 |"), "{md}");
        assert!(md.contains("| | **added by stepgate** | +0.150 |"));

        // With the diagnostic row, the added latency splits into the call and the decision.
        let mut empty = run("f-envoy-empty", 1_000.0, 110.0, 0.40, 1.0);
        empty.rate = Some(1_000.0);
        i.runs.push(empty);
        let targets = i.targets();
        let f = target(&targets, "(f)");
        assert!(
            f[0].note.contains(
                "the ext_authz call itself adds +0.100 ms and stepgate's decision +0.050 ms"
            ),
            "{}",
            f[0].note
        );
        let md = render(&i);
        assert!(
            md.contains("| | **stepgate over the empty server** | +0.050 |"),
            "{md}"
        );

        // An error in either row makes the comparison void.
        let with = i.runs.iter_mut().find(|r| r.label == "f-envoy-stepgate");
        with.unwrap().errors = 1;
        let targets = i.targets();
        assert!(target(&targets, "(f)").iter().all(|t| t.pass.is_none()));
    }

    #[test]
    fn the_glob_worst_case_is_judged_against_the_plain_path() {
        let mut i = input();
        let glob = |i: &Input| target(&i.targets(), "glob worst case")[0].clone();
        assert_eq!(glob(&i).pass, None);
        assert!(glob(&i).note.contains("not measured"), "{:?}", glob(&i));
        i.runs.push(run("g-glob-plain", 40_000.0, 20.0, 0.8, 1.5));
        i.runs.push(run("g-glob-worst", 24_000.0, 32.0, 1.2, 2.0));
        let t = glob(&i);
        // 32 / 20 = 1.6 ≤ 2.
        assert_eq!((t.measured.as_str(), t.verdict()), ("1.60×", "PASS"));
        assert_eq!(t.limit, "≤ 2.00×");
        assert_eq!(
            t.note,
            "32.0 vs 20.0 µs/req; throughput 24,000 vs 40,000 req/s (0.60×)"
        );

        // Three alternating rounds, judged on the medians; one slow worst-case window does not
        // decide it.
        for (plain, worst) in [(21.0, 90.0), (19.0, 30.0)] {
            i.runs.push(run("g-glob-plain", 40_000.0, plain, 0.8, 1.5));
            i.runs.push(run("g-glob-worst", 25_000.0, worst, 1.2, 2.0));
        }
        let t = glob(&i);
        assert_eq!((t.measured.as_str(), t.verdict()), ("1.60×", "PASS"));
        assert!(
            t.note.contains(
                "medians of 3 alternating runs (worst 32.0, 90.0, 30.0; plain 20.0, 21.0, 19.0)"
            ),
            "{}",
            t.note
        );

        // A quadratic matcher: 50 µs against 20.
        for r in i.runs.iter_mut().filter(|r| r.label == "g-glob-worst") {
            r.server.as_mut().unwrap().cpu_us_per_request = 50.0;
        }
        let t = glob(&i);
        assert_eq!((t.measured.as_str(), t.verdict()), ("2.50×", "MISS"));

        // A wrong answer (an ALLOW, or a 400 for the long path) voids the comparison.
        let worst = i.runs.iter_mut().find(|r| r.label == "g-glob-worst");
        let worst = worst.unwrap();
        worst.errors = 4;
        worst.error_samples = vec!["expected HTTP 401 token_missing, got HTTP 400".into()];
        let t = glob(&i);
        assert_eq!(t.pass, None);
        assert!(
            t.note
                .starts_with("not comparable: g-glob-worst had 4 errors"),
            "{}",
            t.note
        );
    }

    #[test]
    fn the_8k_claims_fill_is_judged_on_the_growth_the_cache_adds() {
        let mut i = input();
        let budget = |i: &Input| target(&i.targets(), "memory of 100 000 cached tokens")[0].clone();
        assert_eq!(budget(&i).pass, None);
        for label in ["rss-8k-fill", "rss-8k-nocache"] {
            let mut fill = run(label, 9_000.0, 110.0, 3.0, 6.0);
            fill.generator.sent_total = 100_000;
            i.runs.push(fill);
        }
        for (label, rss, peak) in [
            ("stepgate-8k-start", 14.0, 14.5),
            ("stepgate-8k-fill", 150.0, 160.0),
            ("stepgate-8k-nocache-start", 14.0, 14.5),
            ("stepgate-8k-nocache-fill", 20.0, 24.0),
        ] {
            i.memory.push(MemPoint {
                label: label.into(),
                rss_mib: rss,
                peak_rss_mib: peak,
                token_cache: None,
            });
        }
        let t = budget(&i);
        // (150 − 14) − (20 − 14) = 130 > 128.
        assert_eq!((t.measured.as_str(), t.verdict()), ("+130.0 MiB", "MISS"));
        assert_eq!(t.limit, "≤ 128 MiB");
        assert_eq!(
            t.note,
            "with the cache 14.0 → 150.0 MiB (+136.0), without it 14.0 → 20.0 MiB (+6.0) after \
             100000 distinct tokens; kept whole without a budget, their claims alone would take \
             ≥ 781 MiB (100000 × 8192 B)"
        );
        let filled = |i: &mut Input| {
            i.memory
                .iter_mut()
                .find(|m| m.label == "stepgate-8k-fill")
                .unwrap()
                .clone()
        };
        i.memory
            .iter_mut()
            .find(|m| m.label == "stepgate-8k-fill")
            .unwrap()
            .rss_mib = 145.0;
        assert_eq!(budget(&i).verdict(), "PASS");
        assert_eq!(filled(&mut i).rss_mib, 145.0);
        // With the cache's own gauges, the note gives its estimate.
        i.memory
            .iter_mut()
            .find(|m| m.label == "stepgate-8k-fill")
            .unwrap()
            .token_cache = Some(CacheGauges {
            entries: 12_000,
            mib: 110.0,
            evicted: 88_000,
        });
        assert!(
            budget(&i).note.ends_with(
                "; the cache then held 12000 tokens, 110.0 MiB by its own estimate (88000 \
                 evicted)"
            ),
            "{}",
            budget(&i).note
        );

        // Fewer tokens than the target's (BENCH_DISTINCT) prove nothing about the budget.
        let fill = i
            .runs
            .iter_mut()
            .find(|r| r.label == "rss-8k-fill")
            .unwrap();
        fill.generator.sent_total = 5_000;
        let t = budget(&i);
        assert_eq!(t.pass, None);
        assert!(
            t.note.starts_with("not comparable: 5000 tokens sent"),
            "{}",
            t.note
        );

        // Refused tokens (too large, or the policy's condition failing) are errors.
        let fill = i
            .runs
            .iter_mut()
            .find(|r| r.label == "rss-8k-fill")
            .unwrap();
        fill.generator.sent_total = 100_000;
        fill.errors = 100_000;
        fill.error_samples = vec!["expected OK, got code 16 (token_too_large)".into()];
        let t = budget(&i);
        assert_eq!(t.pass, None);
        assert!(
            t.note.contains("rss-8k-fill had 100000 errors"),
            "{}",
            t.note
        );
        let md = render(&i);
        assert!(md.contains("| stepgate-8k-fill | 145.0 | 160.0 |"), "{md}");
        assert!(
            md.contains("| rss-8k-nocache (end) | 40.0 | 41.0 |"),
            "{md}"
        );
    }

    #[test]
    fn cache_gauges_are_read_from_the_metrics() {
        let metrics = "# HELP stepgate_token_cache_total Verified-token cache lookups\n\
                       # TYPE stepgate_token_cache_total counter\n\
                       stepgate_token_cache_total{event=\"evicted\"} 87776\n\
                       stepgate_token_cache_total{event=\"miss\"} 100000\n\
                       stepgate_token_cache_entries 12224\n\
                       stepgate_token_cache_entries_max 100000\n\
                       stepgate_token_cache_bytes 134182848\n";
        let gauges = CacheGauges::parse(metrics).unwrap();
        assert_eq!((gauges.entries, gauges.evicted), (12_224, 87_776));
        assert!((gauges.mib - 127.966).abs() < 0.001, "{}", gauges.mib);
        let fresh =
            CacheGauges::parse("stepgate_token_cache_entries 0\nstepgate_token_cache_bytes 0\n");
        assert_eq!(fresh.unwrap().evicted, 0);
        assert!(CacheGauges::parse("up 1\n").is_err());
        // A memory point without them still reads.
        let point: MemPoint =
            serde_json::from_str(r#"{"label": "x", "rss_mib": 1.0, "peak_rss_mib": 2.0}"#).unwrap();
        assert_eq!(point.token_cache, None);
    }

    #[test]
    fn deviation_is_the_largest_signed_departure() {
        assert_eq!(deviation(100.0, &[101.0, 97.0]), (-0.03, 97.0, 101.0));
        assert_eq!(deviation(100.0, &[104.0, 99.0]), (0.04, 99.0, 104.0));
    }
}
