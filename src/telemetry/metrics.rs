//! Prometheus metrics: decisions by door, outcome, reason and rule; step-ups by rule and auth
//! context; decision latency; key loads per issuer; policy reloads. Served as text on
//! `--metrics-listen` (`GET /metrics`).
//!
//! Counters live in one process-wide registry of atomics, and the label sets are bounded (reasons
//! are a closed enum; issuers, rules and auth contexts come from the policy, and a reload forgets
//! the series of those it removed).
//!
//! The counters every request adds to (decisions, latency, token-cache events) are striped: each
//! thread adds to its own stripe ([`STRIPES`], assigned round robin at its first count), so no
//! cache line is written by two cores for one request, and a scrape sums the stripes. A decision
//! finds its counter in a map of its own thread (the rule id hashed with foldhash, no lock); the
//! shared map is written only the first time a thread counts a (rule, door, outcome, reason).

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use dashmap::DashMap;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet, prometheus_text},
    metrics::MetricType,
    registry::Registry,
};

use super::records::RecordEvent;
use crate::{
    decision::{Outcome, Reason, StepUp},
    request::Door,
};

type FastMap<K, V> = DashMap<K, V, foldhash::fast::RandomState>;
/// (door, rule id, auth context or acr value) of a step-up counter.
type StepUpKey = (Door, Arc<str>, Arc<str>);

/// Reads (signal, keys tracked, most keys) of every risk signal, at each scrape.
pub type RiskKeysSource = Box<dyn Fn() -> Vec<(Arc<str>, usize, usize)> + Send + Sync>;

/// The `rule` label of a decision no rule matched (the policy's `default`, or a refusal before
/// matching, such as a missing token).
const NO_RULE: &str = "";

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

/// Stripes of the per-request counters. Threads past this many share stripes (still exact: the
/// counters are atomics), so a 64-core machine is the first to share.
const STRIPES: usize = 64;

/// This thread's stripe.
fn stripe() -> usize {
    crate::stripe::of(STRIPES)
}

/// One thread's per-request counters, on cache lines of their own.
#[repr(align(128))]
#[derive(Default)]
struct Stripe {
    latency_buckets: [AtomicU64; LATENCY_BOUNDS_MICROS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    /// One counter per [`CacheEvent`], by discriminant.
    token_cache: [AtomicU64; CacheEvent::ALL.len()],
}

/// A rule's decision counters: (slot, stripe, counter), created as threads first count them.
type DecisionCounters = Mutex<Vec<(u16, u8, Arc<AtomicU64>)>>;

/// A thread's own handles on its decision counters: (the registry they belong to and its
/// generation, rule → (slot, counter)). Cleared when a reload forgets rules, past
/// [`LOCAL_RULES`] rules, or for another registry (tests make their own).
type LocalCounters = (
    (usize, u64),
    HashMap<Arc<str>, Vec<(u16, Arc<AtomicU64>)>, foldhash::fast::RandomState>,
);

/// Rules a thread keeps handles for before it starts over.
const LOCAL_RULES: usize = 4096;

/// Where the counter of (door, outcome, reason) sits in a rule's row.
fn decision_slot(door: Door, outcome: Outcome, reason: Reason) -> usize {
    ((door as usize * OUTCOMES.len()) + outcome as usize) * Reason::ALL.len() + reason as usize
}

/// Upper bounds of the latency histogram, in microseconds.
const LATENCY_BOUNDS_MICROS: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];

pub struct Metrics {
    /// Per rule id ([`NO_RULE`] for none): counters per (door, outcome, reason) at
    /// [`decision_slot`], and stripe.
    decisions: FastMap<Arc<str>, DecisionCounters>,
    /// Bumped when rules are forgotten: threads drop their handles on the old counters.
    decisions_generation: AtomicU64,
    /// STEP_UP decisions by (door, rule id, auth context or acr value asked for).
    step_ups: FastMap<StepUpKey, AtomicU64>,
    stripes: Box<[Stripe]>,
    key_loads: DashMap<(String, &'static str), AtomicU64>,
    keys: DashMap<String, IssuerKeys>,
    reloads: DashMap<&'static str, AtomicU64>,
    unknown_kids: DashMap<(String, &'static str), AtomicU64>,
    grpc_connections: AtomicI64,
    accept_errors: AtomicU64,
    connections_refused: AtomicU64,
    unread_answers: AtomicU64,
    settings_floods: AtomicU64,
    /// Spans of failed OTLP exports (lost).
    spans_export_failed: AtomicU64,
    risk_blocks_evicted: AtomicU64,
    log_lines_dropped: AtomicU64,
    /// Admin API calls by (action, result).
    admin_actions: DashMap<(&'static str, &'static str), AtomicU64>,
    /// Decision records by what became of them ([`RecordEvent`], by discriminant).
    records: [AtomicU64; RecordEvent::ALL.len()],
    /// Shadow outcomes by (rule or `rule/escalate[i]`, outcome, reason).
    shadow_decisions: DashMap<(Arc<str>, Outcome, Reason), AtomicU64>,
    /// Risk signals' thresholds reached, by (signal, action).
    risk_triggers: DashMap<(Arc<str>, &'static str), AtomicU64>,
    /// Keys each risk signal tracks and the most it may: read at each scrape.
    risk_keys: OnceLock<RiskKeysSource>,
    /// Each serving worker's open connections (server/workers.rs), read at each scrape.
    worker_connections: OnceLock<Vec<Arc<AtomicUsize>>>,
    /// The shared risk store: -1 none (not exported), 0 unreachable, 1 connected.
    risk_store_up: AtomicI64,
    risk_store_errors: AtomicU64,
    /// Counter increments the shared store never received (its queue was full or it was down).
    risk_store_unsent: AtomicU64,
    /// Changes received from other replicas through the shared store.
    risk_store_received: AtomicU64,
    /// Blocks and revocations held (expired ones until they are swept).
    blocks_held: AtomicI64,
    revocations_held: AtomicI64,
    token_cache_entries: AtomicI64,
    token_cache_bytes: AtomicI64,
    /// The policy in force: 1 at start, one more per successful reload.
    policy_generation: AtomicI64,
    tls_reloads: DashMap<&'static str, AtomicU64>,
    tls_handshake_errors: AtomicU64,
    /// The serving certificate's `notAfter` (Unix seconds); 0 without TLS (not exported then).
    tls_certificate_expiry: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            decisions: FastMap::default(),
            decisions_generation: AtomicU64::new(0),
            step_ups: FastMap::default(),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            key_loads: DashMap::new(),
            keys: DashMap::new(),
            reloads: DashMap::new(),
            unknown_kids: DashMap::new(),
            grpc_connections: AtomicI64::new(0),
            accept_errors: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            unread_answers: AtomicU64::new(0),
            settings_floods: AtomicU64::new(0),
            spans_export_failed: AtomicU64::new(0),
            risk_blocks_evicted: AtomicU64::new(0),
            log_lines_dropped: AtomicU64::new(0),
            admin_actions: DashMap::new(),
            records: Default::default(),
            shadow_decisions: DashMap::new(),
            risk_triggers: DashMap::new(),
            risk_keys: OnceLock::new(),
            worker_connections: OnceLock::new(),
            risk_store_up: AtomicI64::new(-1),
            risk_store_errors: AtomicU64::new(0),
            risk_store_unsent: AtomicU64::new(0),
            risk_store_received: AtomicU64::new(0),
            blocks_held: AtomicI64::new(0),
            revocations_held: AtomicI64::new(0),
            token_cache_entries: AtomicI64::new(0),
            token_cache_bytes: AtomicI64::new(0),
            policy_generation: AtomicI64::new(1),
            tls_reloads: DashMap::new(),
            tls_handshake_errors: AtomicU64::new(0),
            tls_certificate_expiry: AtomicI64::new(0),
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
    pub fn record_decision(
        &self,
        door: Door,
        outcome: Outcome,
        reason: Reason,
        rule: Option<&Arc<str>>,
        elapsed: Duration,
    ) {
        let slot = decision_slot(door, outcome, reason) as u16;
        let name = rule.map_or(NO_RULE, |r| &**r);
        thread_local! {
            static LOCAL: RefCell<LocalCounters> = RefCell::new(((0, 0), HashMap::default()));
        }
        LOCAL.with_borrow_mut(|(generation, rules)| {
            let current = (
                std::ptr::from_ref(self) as usize,
                self.decisions_generation.load(Relaxed),
            );
            if *generation != current || rules.len() >= LOCAL_RULES {
                rules.clear();
                *generation = current;
            }
            if let Some(counters) = rules.get(name)
                && let Some((_, n)) = counters.iter().find(|(s, _)| *s == slot)
            {
                n.fetch_add(1, Relaxed);
                return;
            }
            // This thread's first count of the series: its counter, from the shared map.
            let key: Arc<str> = rule.map_or_else(|| Arc::from(NO_RULE), Arc::clone);
            let stripe = stripe() as u8;
            let counter = {
                let row = self.decisions.entry(Arc::clone(&key)).or_default();
                let mut row = row.lock().unwrap_or_else(PoisonError::into_inner);
                match row.iter().find(|(s, t, _)| *s == slot && *t == stripe) {
                    Some((_, _, n)) => Arc::clone(n),
                    None => {
                        let n = Arc::new(AtomicU64::new(0));
                        row.push((slot, stripe, Arc::clone(&n)));
                        n
                    }
                }
            };
            counter.fetch_add(1, Relaxed);
            rules.entry(key).or_default().push((slot, counter));
        });
        let micros = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let stripe = &self.stripes[stripe()];
        // One bucket per decision (the smallest bound that holds it); `/metrics` renders the
        // cumulative counts Prometheus expects.
        if let Some(bucket) = LATENCY_BOUNDS_MICROS
            .iter()
            .position(|bound| micros <= *bound)
        {
            stripe.latency_buckets[bucket].fetch_add(1, Relaxed);
        }
        stripe.latency_count.fetch_add(1, Relaxed);
        stripe.latency_sum_micros.fetch_add(micros, Relaxed);
    }

    /// A stripe counter summed over the stripes.
    fn summed(&self, pick: impl Fn(&Stripe) -> &AtomicU64) -> u64 {
        self.stripes.iter().map(|s| pick(s).load(Relaxed)).sum()
    }

    /// A STEP_UP: one count per auth context it asks for (Entra `acrs`), else per `acr` value
    /// asked for, else one with an empty `auth_context` (a freshness-only challenge, `max_age`).
    pub fn record_step_up(&self, door: Door, rule: Option<&Arc<str>>, step_up: &StepUp) {
        let rule: Arc<str> = rule.map_or_else(|| Arc::from(NO_RULE), Arc::clone);
        let asked = if step_up.auth_contexts.is_empty() {
            &step_up.acr_values
        } else {
            &step_up.auth_contexts
        };
        let count = |context: &str| {
            self.step_ups
                .entry((door, Arc::clone(&rule), Arc::from(context)))
                .or_default()
                .fetch_add(1, Relaxed);
        };
        if asked.is_empty() {
            count("");
        }
        for context in asked {
            count(context);
        }
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
        self.stripes[stripe()].token_cache[event as usize].fetch_add(1, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.grpc_connections.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.grpc_connections.fetch_sub(1, Relaxed);
    }

    /// Tokens entered (+) or left (−) a verified-token cache, and their estimated bytes.
    pub fn token_cache_changed(&self, entries: i64, bytes: i64) {
        self.token_cache_entries.fetch_add(entries, Relaxed);
        self.token_cache_bytes.fetch_add(bytes, Relaxed);
    }

    /// One admin API call: `action` (block, unblock, revoke, list) and `result` (ok, refused:
    /// bad arguments or no right, full).
    pub fn record_admin_action(&self, action: &'static str, result: &'static str) {
        self.admin_actions
            .entry((action, result))
            .or_default()
            .fetch_add(1, Relaxed);
    }

    /// What became of a decision record.
    pub fn record_record(&self, event: RecordEvent) {
        self.record_records(event, 1);
    }

    /// What became of `n` decision records.
    pub fn record_records(&self, event: RecordEvent, n: u64) {
        self.records[event as usize].fetch_add(n, Relaxed);
    }

    /// What a shadow rule or escalation would have answered.
    pub fn record_shadow(&self, shadow: &crate::decision::Shadow) {
        let name: Arc<str> = match shadow.escalation {
            None => Arc::clone(&shadow.rule),
            Some(_) => Arc::from(shadow.name()),
        };
        self.shadow_decisions
            .entry((name, shadow.outcome, shadow.reason))
            .or_default()
            .fetch_add(1, Relaxed);
    }

    /// A risk signal reached its threshold; `action` is what it does (log, step_up, block).
    pub fn count_risk_trigger(&self, signal: &Arc<str>, action: &'static str) {
        if let Some(n) = self.risk_triggers.get(&(Arc::clone(signal), action)) {
            n.fetch_add(1, Relaxed);
            return;
        }
        self.risk_triggers
            .entry((Arc::clone(signal), action))
            .or_default()
            .fetch_add(1, Relaxed);
    }

    /// Where `stepgate_worker_connections` is read from at each scrape: worker `i`'s open
    /// connections are `loads[i]`.
    pub fn set_worker_connections(&self, loads: Vec<Arc<AtomicUsize>>) {
        let _ = self.worker_connections.set(loads);
    }

    /// Where `stepgate_risk_keys` is read from at each scrape: (signal, keys, most keys).
    pub fn set_risk_keys_source(&self, source: RiskKeysSource) {
        let _ = self.risk_keys.set(source);
    }

    pub fn set_risk_store_up(&self, up: bool) {
        self.risk_store_up.store(i64::from(up), Relaxed);
    }

    pub fn record_risk_store_error(&self) {
        self.risk_store_errors.fetch_add(1, Relaxed);
    }

    pub fn record_risk_store_unsent(&self, n: u64) {
        self.risk_store_unsent.fetch_add(n, Relaxed);
    }

    pub fn record_risk_store_received(&self) {
        self.risk_store_received.fetch_add(1, Relaxed);
    }

    pub fn set_blocks_held(&self, blocks: usize) {
        self.blocks_held.store(blocks as i64, Relaxed);
    }

    pub fn set_revocations_held(&self, revocations: usize) {
        self.revocations_held.store(revocations as i64, Relaxed);
    }

    pub fn record_log_line_dropped(&self) {
        self.log_lines_dropped.fetch_add(1, Relaxed);
    }

    pub fn log_lines_dropped(&self) -> u64 {
        self.log_lines_dropped.load(Relaxed)
    }

    pub fn record_accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }

    /// A risk signal's source block replaced the one of theirs ending first (their share was full).
    pub fn record_risk_block_evicted(&self) {
        self.risk_blocks_evicted.fetch_add(1, Relaxed);
    }

    /// A connection closed on accept: its source address held `--max-connections-per-source`.
    pub fn record_connection_refused(&self) {
        self.connections_refused.fetch_add(1, Relaxed);
    }

    /// A call's answer not taken by its client by the call's deadline and a second.
    pub fn record_unread_answer(&self) {
        self.unread_answers.fetch_add(1, Relaxed);
    }

    /// A connection closed for sending more SETTINGS frames than a client does.
    pub fn record_settings_flood(&self) {
        self.settings_floods.fetch_add(1, Relaxed);
    }

    /// `spans` spans lost: the OTLP export that held them failed.
    pub fn record_spans_export_failed(&self, spans: u64) {
        self.spans_export_failed.fetch_add(spans, Relaxed);
    }

    pub fn record_tls_reload(&self, ok: bool) {
        self.tls_reloads
            .entry(if ok { "success" } else { "failure" })
            .or_default()
            .fetch_add(1, Relaxed);
    }

    pub fn record_tls_handshake_error(&self) {
        self.tls_handshake_errors.fetch_add(1, Relaxed);
    }

    pub fn set_tls_certificate_expiry(&self, not_after_unix: i64) {
        self.tls_certificate_expiry.store(not_after_unix, Relaxed);
    }

    pub fn record_reload(&self, ok: bool) {
        if ok {
            self.policy_generation.fetch_add(1, Relaxed);
        }
        self.reloads
            .entry(if ok { "success" } else { "failure" })
            .or_default()
            .fetch_add(1, Relaxed);
    }

    /// Forgets the per-issuer series of issuers the current policy no longer has (after a
    /// reload): a gauge of a removed issuer would otherwise report its last value forever.
    pub fn retain_issuers(&self, current: &[&str]) {
        let kept = |issuer: &str| current.contains(&issuer);
        self.keys.retain(|issuer, _| kept(issuer));
        self.key_loads.retain(|(issuer, _), _| kept(issuer));
        self.unknown_kids.retain(|(issuer, _), _| kept(issuer));
    }

    /// Forgets the per-rule series of rules the current policy no longer has (after a reload).
    pub fn retain_rules(&self, current: &[&str]) {
        let kept = |rule: &str| rule == NO_RULE || current.contains(&rule);
        self.decisions.retain(|rule, _| kept(rule));
        self.decisions_generation.fetch_add(1, Relaxed);
        self.step_ups.retain(|(_, rule, _), _| kept(rule));
        self.shadow_decisions
            .retain(|(name, _, _), _| kept(name.split('/').next().unwrap_or_default()));
    }

    /// The Prometheus text exposition (format 0.0.4), written by `prometheus-client`, which
    /// escapes label values and help texts.
    pub fn render(&'static self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exposition(self)));
        let mut out = String::new();
        // Writing to a `String` cannot fail.
        let _ = prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// The registry's atomics, read at each scrape into `prometheus-client`'s encoder.
#[derive(Debug)]
struct Exposition(&'static Metrics);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.0;
        // Label sets in sorted order; only those counted at least once.
        let mut triples: Vec<(Door, Outcome, Reason)> = DOORS
            .iter()
            .flat_map(|&d| OUTCOMES.iter().map(move |&o| (d, o)))
            .flat_map(|(d, o)| Reason::ALL.iter().map(move |&r| (d, o, r)))
            .collect();
        triples.sort_by_key(|(d, o, r)| (d.as_str(), o.as_str(), r.as_str()));
        let slots = DOORS.len() * OUTCOMES.len() * Reason::ALL.len();
        let mut rows: Vec<(Arc<str>, Vec<u64>)> = m
            .decisions
            .iter()
            .map(|row| {
                let mut counts = vec![0; slots];
                for (slot, _, n) in row
                    .value()
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                {
                    counts[usize::from(*slot)] += n.load(Relaxed);
                }
                (Arc::clone(row.key()), counts)
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let mut family = encoder.encode_descriptor(
            "stepgate_decisions",
            "Decisions by front door, outcome, reason and rule (empty: no rule matched)",
            None,
            MetricType::Counter,
        )?;
        for (door, outcome, reason) in triples {
            for (rule, counts) in &rows {
                let n = counts[decision_slot(door, outcome, reason)];
                if n > 0 {
                    let labels = [
                        ("door", door.as_str()),
                        ("outcome", outcome.as_str()),
                        ("reason", reason.as_str()),
                        ("rule", rule),
                    ];
                    counter(&mut family, &labels, n)?;
                }
            }
        }

        let mut step_ups: Vec<(StepUpKey, u64)> = m
            .step_ups
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Relaxed)))
            .collect();
        step_ups
            .sort_by(|(a, _), (b, _)| (a.0.as_str(), &a.1, &a.2).cmp(&(b.0.as_str(), &b.1, &b.2)));
        let mut family = encoder.encode_descriptor(
            "stepgate_step_ups",
            "STEP_UP decisions by front door, rule and the auth context (or acr) asked for",
            None,
            MetricType::Counter,
        )?;
        for ((door, rule, context), n) in &step_ups {
            let labels = [
                ("door", door.as_str()),
                ("rule", &**rule),
                ("auth_context", &**context),
            ];
            counter(&mut family, &labels, *n)?;
        }

        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_MICROS
            .iter()
            .enumerate()
            .map(|(i, bound)| (*bound as f64 / 1e6, m.summed(|s| &s.latency_buckets[i])))
            .collect();
        encoder
            .encode_descriptor(
                "stepgate_decision_duration_seconds",
                "Time to decide, from request to decision",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                m.summed(|s| &s.latency_sum_micros) as f64 / 1e6,
                m.summed(|s| &s.latency_count),
                &buckets,
                None,
            )?;

        let mut family = encoder.encode_descriptor(
            "stepgate_key_loads",
            "Key-set loads (start-up, refresh and on-demand) per issuer and result",
            None,
            MetricType::Counter,
        )?;
        for ((issuer, result), n) in sorted(&m.key_loads) {
            counter(
                &mut family,
                &[("issuer", issuer.as_str()), ("result", result)],
                n,
            )?;
        }

        let mut keys: Vec<(String, u64, i64)> = m
            .keys
            .iter()
            .map(|e| {
                let keys = e.value();
                let (count, at) = (
                    keys.count.load(Relaxed),
                    keys.last_success_unix.load(Relaxed),
                );
                (e.key().clone(), count, at)
            })
            .collect();
        keys.sort();
        let mut family = encoder.encode_descriptor(
            "stepgate_keys",
            "Signing keys currently loaded per issuer",
            None,
            MetricType::Gauge,
        )?;
        for (issuer, count, _) in &keys {
            gauge(&mut family, &[("issuer", issuer.as_str())], *count as i64)?;
        }
        let mut family = encoder.encode_descriptor(
            "stepgate_key_last_success_timestamp_seconds",
            "Unix time of the last successful key load per issuer",
            None,
            MetricType::Gauge,
        )?;
        for (issuer, _, at) in &keys {
            gauge(&mut family, &[("issuer", issuer.as_str())], *at)?;
        }

        let mut family = encoder.encode_descriptor(
            "stepgate_unknown_kid",
            "Tokens with a kid the issuer's keys lacked, by what an on-demand fetch found",
            None,
            MetricType::Counter,
        )?;
        for ((issuer, outcome), n) in sorted(&m.unknown_kids) {
            counter(
                &mut family,
                &[("issuer", issuer.as_str()), ("outcome", outcome)],
                n,
            )?;
        }

        let mut family = encoder.encode_descriptor(
            "stepgate_token_cache",
            "Verified-token cache lookups (hit, miss) and evictions (size or time)",
            None,
            MetricType::Counter,
        )?;
        for event in CacheEvent::ALL {
            let n = m.summed(|s| &s.token_cache[event as usize]);
            if n > 0 {
                counter(&mut family, &[("event", event.as_str())], n)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "stepgate_policy_reloads",
            "Policy reloads by result",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in sorted(&m.reloads) {
            counter(&mut family, &[("result", result)], n)?;
        }

        let expiry = m.tls_certificate_expiry.load(Relaxed);
        if expiry != 0 {
            let mut family = encoder.encode_descriptor(
                "stepgate_tls_reloads",
                "Reloads of the gRPC listener's TLS files by result",
                None,
                MetricType::Counter,
            )?;
            for (result, n) in sorted(&m.tls_reloads) {
                counter(&mut family, &[("result", result)], n)?;
            }
            encoder
                .encode_descriptor(
                    "stepgate_tls_handshake_errors",
                    "TLS handshakes on the gRPC listener that failed or timed out (mTLS refusals included)",
                    None,
                    MetricType::Counter,
                )?
                .encode_counter::<NoLabelSet, _, u64>(&m.tls_handshake_errors.load(Relaxed), None)?;
            encoder
                .encode_descriptor(
                    "stepgate_tls_certificate_expiry_timestamp_seconds",
                    "notAfter of the certificate the gRPC listener serves (Unix time)",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&expiry)?;
        }

        for (name, help, value) in [
            (
                "stepgate_log_lines_dropped",
                "Log lines dropped because stderr did not take them",
                &m.log_lines_dropped,
            ),
            (
                "stepgate_grpc_accept_errors",
                "Failed accepts on the gRPC listener (out of file descriptors, aborted connections)",
                &m.accept_errors,
            ),
            (
                "stepgate_risk_source_blocks_replaced",
                "Source blocks of risk signals replaced, ending first, by a newer one when risk signals held their share of the source-block table",
                &m.risk_blocks_evicted,
            ),
            (
                "stepgate_grpc_connections_refused",
                "Connections closed on accept because their source address already held --max-connections-per-source",
                &m.connections_refused,
            ),
            (
                "stepgate_grpc_unread_answers",
                "Calls whose answer the client did not take (HTTP/2 flow control) by the call's deadline and a second: the stream was reset and the connection told to go away",
                &m.unread_answers,
            ),
            (
                "stepgate_grpc_settings_floods",
                "Connections closed because their client sent more HTTP/2 SETTINGS frames than a client does (each makes the server walk every open stream)",
                &m.settings_floods,
            ),
            (
                "stepgate_trace_spans_export_failed",
                "Spans lost because their OTLP export failed",
                &m.spans_export_failed,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&value.load(Relaxed), None)?;
        }
        for (name, help, value) in [
            (
                "stepgate_grpc_connections",
                "Open connections on the gRPC listener",
                &m.grpc_connections,
            ),
            (
                "stepgate_token_cache_entries",
                "Verified tokens cached",
                &m.token_cache_entries,
            ),
            (
                "stepgate_token_cache_bytes",
                "Estimated memory of the verified tokens cached (bounded by limits.token_cache_bytes)",
                &m.token_cache_bytes,
            ),
            (
                "stepgate_policy_generation",
                "The policy in force: 1 at start, one more per successful reload",
                &m.policy_generation,
            ),
            (
                "stepgate_blocks",
                "Blocks held (admin API), until expired ones are swept",
                &m.blocks_held,
            ),
            (
                "stepgate_revocations",
                "Subjects whose sessions are revoked (admin API), kept 48 h after the revocation time",
                &m.revocations_held,
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value.load(Relaxed))?;
        }
        let mut actions: Vec<((&str, &str), u64)> = m
            .admin_actions
            .iter()
            .map(|e| (*e.key(), e.value().load(Relaxed)))
            .collect();
        actions.sort();
        let mut family = encoder.encode_descriptor(
            "stepgate_admin_actions",
            "Admin API calls by action and result (ok, refused, full)",
            None,
            MetricType::Counter,
        )?;
        for ((action, result), n) in actions {
            counter(&mut family, &[("action", action), ("result", result)], n)?;
        }

        let mut family = encoder.encode_descriptor(
            "stepgate_records",
            "Decision records: written, dropped (the queue was full or the file could not be written), ALLOWs sampled out, and decisions without a verified token past records.unverified_per_second (rate_limited)",
            None,
            MetricType::Counter,
        )?;
        for event in RecordEvent::ALL {
            counter(
                &mut family,
                &[("result", event.as_str())],
                m.records[event as usize].load(Relaxed),
            )?;
        }
        type ShadowRow<'a> = ((Arc<str>, &'a str, &'a str), u64);
        let mut shadows: Vec<ShadowRow<'_>> = m
            .shadow_decisions
            .iter()
            .map(|e| {
                let (rule, outcome, reason) = e.key();
                (
                    (Arc::clone(rule), outcome.as_str(), reason.as_str()),
                    e.value().load(Relaxed),
                )
            })
            .collect();
        shadows.sort();
        let mut family = encoder.encode_descriptor(
            "stepgate_shadow_decisions",
            "What rules and escalations in shadow mode would have answered, by rule (rule/escalate[i] for an escalation), outcome and reason",
            None,
            MetricType::Counter,
        )?;
        for ((rule, outcome, reason), n) in shadows {
            counter(
                &mut family,
                &[("rule", &rule), ("outcome", outcome), ("reason", reason)],
                n,
            )?;
        }
        let mut triggers: Vec<((Arc<str>, &str), u64)> = m
            .risk_triggers
            .iter()
            .map(|e| (e.key().clone(), e.value().load(Relaxed)))
            .collect();
        triggers.sort();
        let mut family = encoder.encode_descriptor(
            "stepgate_risk_triggers",
            "Risk signals that reached their threshold, by signal and action (log, step_up, block)",
            None,
            MetricType::Counter,
        )?;
        for ((signal, action), n) in triggers {
            counter(&mut family, &[("signal", &signal), ("action", action)], n)?;
        }
        if let Some(loads) = m.worker_connections.get() {
            let mut family = encoder.encode_descriptor(
                "stepgate_worker_connections",
                "Open gRPC connections each serving worker holds (--balance connections)",
                None,
                MetricType::Gauge,
            )?;
            for (worker, load) in loads.iter().enumerate() {
                let worker = worker.to_string();
                gauge(
                    &mut family,
                    &[("worker", &worker)],
                    load.load(Relaxed) as i64,
                )?;
            }
        }
        if let Some(source) = m.risk_keys.get() {
            let rows = source();
            let mut family = encoder.encode_descriptor(
                "stepgate_risk_keys",
                "Keys a risk signal tracks (bounded by risk.max_keys)",
                None,
                MetricType::Gauge,
            )?;
            for (signal, keys, _) in &rows {
                gauge(&mut family, &[("signal", signal)], *keys as i64)?;
            }
            let mut family = encoder.encode_descriptor(
                "stepgate_risk_keys_max",
                "Most keys a risk signal may track",
                None,
                MetricType::Gauge,
            )?;
            for (signal, _, max) in &rows {
                gauge(&mut family, &[("signal", signal)], *max as i64)?;
            }
        }
        let up = m.risk_store_up.load(Relaxed);
        if up >= 0 {
            encoder
                .encode_descriptor(
                    "stepgate_risk_store_up",
                    "Whether the shared risk store (Redis) is connected",
                    None,
                    MetricType::Gauge,
                )?
                .encode_gauge(&up)?;
            for (name, help, value) in [
                (
                    "stepgate_risk_store_errors",
                    "Failed connections and commands to the shared risk store",
                    &m.risk_store_errors,
                ),
                (
                    "stepgate_risk_store_unsent",
                    "Counter increments the shared risk store never received (queue full or store down); they still count here",
                    &m.risk_store_unsent,
                ),
                (
                    "stepgate_risk_store_received",
                    "Changes received from other replicas through the shared risk store",
                    &m.risk_store_received,
                ),
            ] {
                encoder
                    .encode_descriptor(name, help, None, MetricType::Counter)?
                    .encode_counter::<NoLabelSet, _, u64>(&value.load(Relaxed), None)?;
            }
        }

        let mut info = encoder.encode_descriptor(
            "stepgate_build_info",
            "The running build (always 1; the version is a label)",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut info, &[("version", env!("CARGO_PKG_VERSION"))], 1)?;
        Ok(())
    }
}

fn counter(
    family: &mut MetricEncoder<'_>,
    labels: &[(&str, &str)],
    value: u64,
) -> Result<(), std::fmt::Error> {
    family
        .encode_family(&labels)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge(
    family: &mut MetricEncoder<'_>,
    labels: &[(&str, &str)],
    value: i64,
) -> Result<(), std::fmt::Error> {
    family.encode_family(&labels)?.encode_gauge(&value)
}

/// A map's counters by key, sorted for stable output.
fn sorted<K: Clone + Ord + std::hash::Hash + Eq>(
    counters: &DashMap<K, AtomicU64>,
) -> Vec<(K, u64)> {
    let mut rows: Vec<(K, u64)> = counters
        .iter()
        .map(|e| (e.key().clone(), e.value().load(Relaxed)))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Bounds of the `/metrics` listener: an anonymous client may hold at most this much of it.
mod listener_limits {
    use std::time::Duration;

    /// Connections served at once; more wait in the listen backlog, costing nothing.
    pub const CONNECTIONS: usize = 64;
    /// Connections served at once from one source address: more are closed on accept, so that
    /// one client cannot hold every slot (a scrape takes one connection).
    pub const PER_SOURCE: usize = 8;
    /// Time for a client to send its request head (slowloris).
    pub const HEADER_READ: Duration = Duration::from_secs(5);
    /// Longest a connection lives, whatever it does (one scrape takes milliseconds).
    pub const CONNECTION: Duration = Duration::from_secs(30);
    /// Pause after a failed accept (out of file descriptors), instead of a busy loop.
    pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
}

/// Serves `GET /metrics` (and 404 for anything else) on `listener` until the task is dropped.
///
/// Anyone who can reach the port can connect, so it is bounded like the gRPC listener: at most
/// [`listener_limits::CONNECTIONS`] served at once, [`listener_limits::PER_SOURCE`] from one
/// address, each given
/// [`listener_limits::HEADER_READ`] for its request head and [`listener_limits::CONNECTION`] in
/// all, one request per connection; accept errors pause instead of spinning. Idle or slow
/// clients then hold a few sockets and no CPU, and `Check` on the other port does not notice.
pub async fn serve(listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tokio::sync::Semaphore;

    let slots = std::sync::Arc::new(Semaphore::new(listener_limits::CONNECTIONS));
    let sources = crate::server::Sources::new(listener_limits::PER_SOURCE);
    loop {
        let slot = std::sync::Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, source) = loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    if let Some(source) = sources.take(peer.ip()) {
                        break (stream, source);
                    }
                    // Closed at once: this address holds its share of the slots already.
                }
                Err(_) => tokio::time::sleep(listener_limits::ACCEPT_ERROR_PAUSE).await,
            }
        };
        tokio::spawn(async move {
            let _slots = (slot, source);
            let service = service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    let response = if request.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", prometheus_text::CONTENT_TYPE)
                            .body(Full::new(Bytes::from(global().render())))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    Ok::<_, hyper::http::Error>(response.expect("static response parts are valid"))
                },
            );
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(listener_limits::HEADER_READ)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(listener_limits::CONNECTION, connection).await;
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
        let m: &'static Metrics = Box::leak(Box::default());
        let missing = (Door::Check, Outcome::Deny, Reason::TokenMissing);
        m.record_decision(
            missing.0,
            missing.1,
            missing.2,
            None,
            Duration::from_micros(40),
        );
        m.record_decision(
            missing.0,
            missing.1,
            missing.2,
            None,
            Duration::from_micros(400),
        );
        let payments: Arc<str> = Arc::from("payments");
        m.record_decision(
            Door::Offline,
            Outcome::Allow,
            Reason::Allowed,
            Some(&payments),
            Duration::ZERO,
        );
        m.record_token_cache(CacheEvent::Miss);
        m.record_token_cache(CacheEvent::Hit);
        m.record_token_cache(CacheEvent::Hit);
        m.record_key_load("demo", Ok(2), 1_700_000_000);
        m.record_key_load("demo", Err(()), 1_700_000_100);
        let text = m.render();
        assert!(text.contains("stepgate_decisions_total{door=\"check\",outcome=\"DENY\",reason=\"token_missing\",rule=\"\"} 2"), "{text}");
        assert!(
            text.contains("stepgate_decision_duration_seconds_bucket{le=\"5e-05\"} 2"),
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
                "stepgate_decisions_total{door=\"check\",outcome=\"DENY\",reason=\"token_missing\",rule=\"\"} 2",
                "stepgate_decisions_total{door=\"offline\",outcome=\"ALLOW\",reason=\"allowed\",rule=\"payments\"} 1",
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
        assert!(
            text.contains("# TYPE stepgate_log_lines_dropped_total counter"),
            "{text}"
        );
        assert!(text.contains("stepgate_policy_generation 1"), "{text}");
        m.record_reload(true);
        m.record_reload(false);
        assert!(m.render().contains("stepgate_policy_generation 2"));
        assert!(
            text.contains(&format!(
                "stepgate_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }

    #[test]
    fn issuers_a_reload_removed_leave_the_exposition() {
        let m: &'static Metrics = Box::leak(Box::default());
        m.record_key_load("kept", Ok(1), 1);
        m.record_key_load("gone", Ok(3), 1);
        m.record_unknown_kid("gone", "absent");
        m.retain_issuers(&["kept"]);
        let text = m.render();
        assert!(text.contains("stepgate_keys{issuer=\"kept\"} 1"), "{text}");
        assert!(!text.contains("gone"), "{text}");
    }

    fn step_up(auth_contexts: &[&str], acr_values: &[&str]) -> StepUp {
        StepUp {
            style: "entra",
            auth_contexts: auth_contexts.iter().map(|s| s.to_string()).collect(),
            missing_auth_contexts: Vec::new(),
            acr_values: acr_values.iter().map(|s| s.to_string()).collect(),
            max_age: None,
            amr: Vec::new(),
            claims: None,
        }
    }

    /// Threads count into their own stripes; the scrape sums them, and a rule forgotten by a
    /// reload and added again counts afresh in every thread.
    #[test]
    fn counts_from_many_threads_add_up_and_survive_a_reload() {
        let m: &'static Metrics = Box::leak(Box::default());
        let rule: Arc<str> = Arc::from("orders");
        let here = || {
            m.record_decision(
                Door::Check,
                Outcome::Allow,
                Reason::Allowed,
                Some(&rule),
                Duration::from_micros(30),
            )
        };
        let count = |n: usize| {
            std::thread::scope(|scope| {
                for _ in 0..8 {
                    scope.spawn(|| {
                        for _ in 0..n {
                            here();
                            m.record_token_cache(CacheEvent::Hit);
                        }
                    });
                }
            });
        };
        let line = |text: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("stepgate_decisions_total{") && l.contains("rule=\"orders\"")
                })
                .map(str::to_owned)
        };
        count(1000);
        here();
        let text = m.render();
        assert_eq!(
            line(&text).as_deref(),
            Some(
                "stepgate_decisions_total{door=\"check\",outcome=\"ALLOW\",reason=\"allowed\",rule=\"orders\"} 8001"
            )
        );
        assert!(
            text.contains("stepgate_decision_duration_seconds_count 8001"),
            "{text}"
        );
        assert!(
            text.contains("stepgate_token_cache_total{event=\"hit\"} 8000"),
            "{text}"
        );
        m.retain_rules(&[]);
        assert_eq!(line(&m.render()), None, "forgotten with its rule");
        // This thread's handle on the forgotten counter is dropped: its next count is seen.
        here();
        count(10);
        assert!(
            line(&m.render()).unwrap().ends_with("} 81"),
            "{:?}",
            line(&m.render())
        );
    }

    #[test]
    fn step_ups_count_per_rule_and_auth_context_and_leave_with_their_rule() {
        let m: &'static Metrics = Box::leak(Box::default());
        let wire: Arc<str> = Arc::from("wire-transfer");
        let admin: Arc<str> = Arc::from("admin");
        m.record_step_up(Door::Check, Some(&wire), &step_up(&["c1", "c2"], &[]));
        m.record_step_up(Door::Check, Some(&wire), &step_up(&["c1"], &[]));
        m.record_step_up(Door::Decide, Some(&admin), &step_up(&[], &["phr"]));
        m.record_step_up(Door::Decide, Some(&admin), &step_up(&[], &[]));
        let text = m.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("stepgate_step_ups_total{"))
            .collect();
        assert_eq!(
            lines,
            [
                "stepgate_step_ups_total{door=\"check\",rule=\"wire-transfer\",auth_context=\"c1\"} 2",
                "stepgate_step_ups_total{door=\"check\",rule=\"wire-transfer\",auth_context=\"c2\"} 1",
                "stepgate_step_ups_total{door=\"decide\",rule=\"admin\",auth_context=\"\"} 1",
                "stepgate_step_ups_total{door=\"decide\",rule=\"admin\",auth_context=\"phr\"} 1",
            ],
            "{text}"
        );

        m.record_decision(
            Door::Check,
            Outcome::StepUp,
            Reason::MissingAuthContext,
            Some(&wire),
            Duration::ZERO,
        );
        m.record_decision(
            Door::Check,
            Outcome::Deny,
            Reason::TokenMissing,
            None,
            Duration::ZERO,
        );
        m.retain_rules(&["admin"]);
        let text = m.render();
        assert!(!text.contains("wire-transfer"), "{text}");
        assert!(
            text.contains("rule=\"admin\",auth_context=\"phr\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("reason=\"token_missing\",rule=\"\"} 1"),
            "{text}"
        );
    }
}
