//! OpenTelemetry traces, exported over OTLP/gRPC: one span per decision, under the caller's span
//! (Envoy's ext_authz client span, or a service's), and one per key-set load and policy reload.
//!
//! Off by default. On when `--otlp-endpoint` is given, or when one of the standard variables
//! `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_SAMPLER` is
//! set (and `OTEL_TRACES_EXPORTER` is not `none`). The SDK reads the rest of the standard
//! variables itself: the sampler (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; by default
//! `parentbased_always_on`, so Envoy's sampling decision holds), headers, timeout, and
//! `OTEL_SERVICE_NAME` (`stepgate` unless set).
//!
//! The spans are made with the OpenTelemetry API directly, not through `tracing` spans: a
//! decision then costs nothing when traces are off (one load of an empty `OnceLock`), and when
//! they are on, no `tracing` registry span is allocated per request besides the OpenTelemetry
//! one; an unsampled decision makes a non-recording span only.
//!
//! A span never carries a token, a claim value or a header value: its attributes are the door,
//! outcome, rule, reason, issuer id, HTTP status, whether the token came from the cache, and the
//! token's fingerprint (a hash prefix, as in the decision log).
//!
//! What a caller sends is bounded before it reaches a span: the parent's `tracestate`, which the
//! span carries and exports, is kept only up to [`MAX_TRACESTATE_BYTES`] (W3C Trace Context's
//! truncation, below). Without the bound a caller could attach 16 KiB to every span, and one
//! batch of them would be larger than the collector accepts (4 MiB by default) and lost whole,
//! legitimate spans with it. An export that fails is logged (at most once a minute, with how many
//! exports and spans were lost since), never silently dropped.

use std::{
    borrow::Cow,
    sync::{Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, TextMapPropagator as _},
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter},
};

use crate::{decision::Decision, request::Door, telemetry::Printable};

/// The environment variables that turn traces on (besides `--otlp-endpoint`).
const ENABLING_VARIABLES: [&str; 3] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
];

struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

static TRACING: OnceLock<Tracing> = OnceLock::new();

/// Whether the flag or the environment asks for traces.
pub fn requested(endpoint: Option<&str>) -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let exporter_none = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    endpoint.is_some() || (!exporter_none && ENABLING_VARIABLES.iter().any(|v| set(v)))
}

/// Starts the exporter (a batch exporter on its own thread) when traces are requested. Runs
/// inside the Tokio runtime: the OTLP client is a tonic channel of that runtime.
pub fn init(endpoint: Option<&str>) -> Result<bool, String> {
    if !requested(endpoint) || TRACING.get().is_some() {
        return Ok(TRACING.get().is_some());
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        exporter = exporter.with_endpoint(endpoint);
    }
    if let Some(tls) = collector_tls()? {
        use opentelemetry_otlp::WithTonicConfig as _;
        exporter = exporter.with_tls_config(tls);
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("stepgate");
    }
    // The SDK's batches (512 spans by default) stay far below a collector's 4 MiB: a decision
    // span is under 1 KiB with its tracestate bounded.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(ReportedExporter::new(exporter))
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("stepgate");
    let _ = TRACING.set(Tracing { provider, tracer });
    Ok(true)
}

/// The collector's TLS settings from the standard variables: `OTEL_EXPORTER_OTLP_CERTIFICATE` (the
/// CA bundle its certificate must chain to, instead of the bundled web roots) and, for mutual TLS,
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` with `OTEL_EXPORTER_OTLP_CLIENT_KEY` (each also in its
/// `OTEL_EXPORTER_OTLP_TRACES_*` form, which wins). `None` when none is set: an https endpoint
/// then trusts the web roots.
fn collector_tls() -> Result<Option<tonic::transport::ClientTlsConfig>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let var = |name: &str| {
        [
            format!("OTEL_EXPORTER_OTLP_TRACES_{name}"),
            format!("OTEL_EXPORTER_OTLP_{name}"),
        ]
        .into_iter()
        .find_map(|v| {
            std::env::var(&v)
                .ok()
                .filter(|s| !s.is_empty())
                .map(|s| (v, s))
        })
    };
    let read = |(variable, path): (String, String)| {
        std::fs::read(&path).map_err(|e| format!("{variable}={path}: {e}"))
    };
    let (ca, cert, key) = (
        var("CERTIFICATE"),
        var("CLIENT_CERTIFICATE"),
        var("CLIENT_KEY"),
    );
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    tls = match ca {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => tls.with_webpki_roots(),
    };
    match (cert, key) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => {
            return Err(
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY go together"
                    .to_owned(),
            );
        }
    }
    Ok(Some(tls))
}

/// How often at most a failed export is logged.
const EXPORT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

/// The OTLP exporter, with its failures logged: the SDK's batch processor drops a batch it could
/// not export without a word (its own diagnostics, the `internal-logs` feature, are not built).
#[derive(Debug)]
struct ReportedExporter<E> {
    inner: E,
    failures: Mutex<ExportFailures>,
}

/// The failed exports not yet logged, and when the last warning was.
#[derive(Debug, Default)]
struct ExportFailures {
    exports: u64,
    spans: u64,
    last_logged: Option<Instant>,
}

impl<E> ReportedExporter<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            failures: Mutex::default(),
        }
    }

    /// Counts a failed export of `spans` spans and logs it: the first at once, the next ones at
    /// most once per [`EXPORT_FAILURE_LOG_EVERY`], with how many failed meanwhile.
    fn failed(&self, spans: usize, error: &dyn std::fmt::Display) {
        super::metrics::global().record_spans_export_failed(spans as u64);
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        failures.exports += 1;
        failures.spans += spans as u64;
        let now = Instant::now();
        if failures
            .last_logged
            .is_some_and(|at| now.duration_since(at) < EXPORT_FAILURE_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            error = %Printable(&error.to_string()),
            failed_exports = failures.exports,
            spans_lost = failures.spans,
            "exporting spans to the OTLP collector failed; those spans are lost (logged at most once a minute)"
        );
        *failures = ExportFailures {
            last_logged: Some(now),
            ..ExportFailures::default()
        };
    }
}

impl<E: SpanExporter> SpanExporter for ReportedExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        if let Err(error) = &result {
            self.failed(spans, error);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Exports what is pending and stops the exporter (at exit; waits at most a few seconds).
pub fn shutdown() {
    if let Some(tracing) = TRACING.get()
        && let Err(err) = tracing
            .provider
            .shutdown_with_timeout(Duration::from_secs(3))
    {
        tracing::warn!(error = %err, "exporting the last spans failed");
    }
}

fn tracer() -> Option<&'static SdkTracer> {
    TRACING.get().map(|t| &t.tracer)
}

// ---------------------------------------------------------------------------------------------
// The caller's span
// ---------------------------------------------------------------------------------------------

/// The longest `tracestate` a decision span takes from its parent, in bytes: the W3C Trace
/// Context's 512 characters, which every vendor should propagate. A longer one is truncated as
/// that specification says ([`bounded_tracestate`]).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// The longest `tracestate` member kept when one over [`MAX_TRACESTATE_BYTES`] is truncated.
const MAX_TRACESTATE_MEMBER_BYTES: usize = 128;

/// The most members a `tracestate` list holds (W3C Trace Context, §3.3.1.1).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// `tracestate` within [`MAX_TRACESTATE_BYTES`], as W3C Trace Context (§3.3.1.5) has a vendor
/// truncate: first the members longer than 128 characters go, then members from the end until
/// the rest fits. One that fits is kept as it is (borrowed).
pub fn bounded_tracestate(tracestate: &str) -> Cow<'_, str> {
    if tracestate.len() <= MAX_TRACESTATE_BYTES {
        return Cow::Borrowed(tracestate);
    }
    let (mut kept, mut members) = (String::new(), 0);
    for member in tracestate
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty() && m.len() <= MAX_TRACESTATE_MEMBER_BYTES)
    {
        let separator = usize::from(!kept.is_empty());
        if kept.len() + separator + member.len() > MAX_TRACESTATE_BYTES
            || members == MAX_TRACESTATE_MEMBERS
        {
            break;
        }
        members += 1;
        if separator == 1 {
            kept.push(',');
        }
        kept.push_str(member);
    }
    Cow::Owned(kept)
}

/// The span context a request names as its parent, read from its headers (gRPC metadata, or the
/// HTTP request's headers): W3C `traceparent` (with `tracestate`, bounded by
/// [`bounded_tracestate`]), else B3 (`b3`, or the `x-b3-*` headers Envoy's Zipkin tracer
/// sends). `None` when traces are off or nothing valid is there.
pub fn parent<'h>(get: impl Fn(&str) -> Option<&'h str>) -> Option<SpanContext> {
    tracer()?;
    w3c_parent(&get).or_else(|| b3(&get))
}

/// A W3C parent: `traceparent`, with its `tracestate` bounded.
fn w3c_parent<'h>(get: &impl Fn(&str) -> Option<&'h str>) -> Option<SpanContext> {
    get("traceparent").and_then(|traceparent| {
        struct W3c<'a> {
            traceparent: &'a str,
            tracestate: Option<&'a str>,
        }
        impl Extractor for W3c<'_> {
            fn get(&self, key: &str) -> Option<&str> {
                match key {
                    "traceparent" => Some(self.traceparent),
                    "tracestate" => self.tracestate,
                    _ => None,
                }
            }
            fn keys(&self) -> Vec<&str> {
                vec!["traceparent", "tracestate"]
            }
        }
        let tracestate = get("tracestate").map(bounded_tracestate);
        let headers = W3c {
            traceparent,
            tracestate: tracestate.as_deref(),
        };
        let cx = TraceContextPropagator::new().extract(&headers);
        let span = cx.span().span_context().clone();
        span.is_valid().then_some(span)
    })
}

/// A B3 parent: the single `b3` header, else `x-b3-traceid` and `x-b3-spanid`.
pub fn b3<'h>(get: &impl Fn(&str) -> Option<&'h str>) -> Option<SpanContext> {
    let (trace, span, sampled) = match get("b3") {
        Some(single) => parse_b3_single(single)?,
        None => {
            let sampled = match get("x-b3-flags") {
                Some("1") => Some(true),
                _ => match get("x-b3-sampled") {
                    Some("1" | "true") => Some(true),
                    Some("0" | "false") => Some(false),
                    None => None,
                    Some(_) => return None,
                },
            };
            let trace = parse_b3_trace_id(get("x-b3-traceid")?)?;
            let span = parse_b3_span_id(get("x-b3-spanid")?)?;
            (trace, span, sampled)
        }
    };
    let flags = if sampled.unwrap_or(false) {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(
        trace,
        span,
        flags,
        true,
        TraceState::default(),
    ))
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`; a lone sampling state names no parent.
pub fn parse_b3_single(value: &str) -> Option<(TraceId, SpanId, Option<bool>)> {
    let mut parts = value.split('-');
    let trace = parse_b3_trace_id(parts.next()?)?;
    let span = parse_b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some("1" | "d") => Some(true),
        Some("0") => Some(false),
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        parse_b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((trace, span, sampled))
}

/// 16 or 32 lower-case hex digits, not all zero (a 64-bit id is the low half of a 128-bit one).
fn parse_b3_trace_id(hex: &str) -> Option<TraceId> {
    if !(hex.len() == 16 || hex.len() == 32) || !is_lower_hex(hex) {
        return None;
    }
    let id = u128::from_str_radix(hex, 16).ok()?;
    (id != 0).then(|| TraceId::from(id))
}

/// 16 lower-case hex digits, not all zero.
fn parse_b3_span_id(hex: &str) -> Option<SpanId> {
    if hex.len() != 16 || !is_lower_hex(hex) {
        return None;
    }
    let id = u64::from_str_radix(hex, 16).ok()?;
    (id != 0).then(|| SpanId::from(id))
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ---------------------------------------------------------------------------------------------
// Spans
// ---------------------------------------------------------------------------------------------

/// The span of one decision; ends when [`DecisionSpan::end`] is given the decision.
pub struct DecisionSpan(Option<Span>);

/// Starts a decision's span (a server span under `parent`, or a root), when traces are on.
pub fn start_decision(door: Door, parent: Option<SpanContext>) -> DecisionSpan {
    let Some(tracer) = tracer() else {
        return DecisionSpan(None);
    };
    let cx = match parent {
        Some(parent) => Context::new().with_remote_span_context(parent),
        None => Context::new(),
    };
    let span = tracer
        .span_builder(match door {
            Door::Check => "stepgate Check",
            Door::Decide => "stepgate Decide",
            Door::Offline => "stepgate decide",
        })
        .with_kind(SpanKind::Server)
        .start_with_context(tracer, &cx);
    DecisionSpan(Some(span))
}

impl DecisionSpan {
    pub fn end(self, door: Door, decision: &Decision) {
        let Some(mut span) = self.0 else { return };
        if span.is_recording() {
            let mut attributes = vec![
                KeyValue::new("stepgate.door", door.as_str()),
                KeyValue::new("stepgate.outcome", decision.outcome.as_str()),
                KeyValue::new("stepgate.reason", decision.reason.as_str()),
                KeyValue::new("stepgate.http_status", i64::from(decision.http_status)),
            ];
            if let Some(rule) = &decision.rule {
                attributes.push(KeyValue::new("stepgate.rule", rule.to_string()));
            }
            if let Some(principal) = &decision.principal {
                attributes.push(KeyValue::new(
                    "stepgate.issuer_id",
                    principal.issuer_id.to_string(),
                ));
            }
            if let Some(cached) = decision.token_cached {
                attributes.push(KeyValue::new("stepgate.token_cache_hit", cached));
            }
            if let Some(fingerprint) = &decision.token_fingerprint {
                attributes.push(KeyValue::new("stepgate.token", fingerprint.clone()));
            }
            span.set_attributes(attributes);
            if decision.http_status >= 500 {
                span.set_status(Status::error(Cow::Borrowed(decision.reason.as_str())));
            }
        }
        span.end();
    }
}

/// A span of background work (a key-set load, a policy reload): a root span, ended on drop.
pub struct WorkSpan(Option<Span>);

pub fn start_work(name: &'static str, attributes: Vec<KeyValue>) -> WorkSpan {
    WorkSpan(tracer().map(|tracer| {
        tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_attributes(attributes)
            .start(tracer)
    }))
}

impl WorkSpan {
    /// Marks the work failed, with why (a message stepgate wrote: no secret in it).
    pub fn failed(&mut self, why: &str) {
        if let Some(span) = &mut self.0 {
            span.set_status(Status::error(why.to_owned()));
        }
    }
}

impl Drop for WorkSpan {
    fn drop(&mut self) {
        if let Some(span) = &mut self.0 {
            span.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b3_single_header_forms() {
        let trace = "80f198ee56343ba864fe8b2a57d3eff7";
        let span = "e457b5a2e4d86bd1";
        let (t, s, sampled) = parse_b3_single(&format!("{trace}-{span}-1-05e3ac9a4f6e3b90"))
            .expect("a full b3 header");
        assert_eq!(format!("{t}"), trace);
        assert_eq!(format!("{s}"), span);
        assert_eq!(sampled, Some(true));
        assert_eq!(parse_b3_single(&format!("{trace}-{span}")).unwrap().2, None);
        assert_eq!(
            parse_b3_single(&format!("{trace}-{span}-0")).unwrap().2,
            Some(false)
        );
        // A 64-bit trace id is the low half.
        let (t, _, _) = parse_b3_single(&format!("64fe8b2a57d3eff7-{span}-d")).unwrap();
        assert_eq!(format!("{t}"), "000000000000000064fe8b2a57d3eff7");
        for bad in [
            "1",
            "0",
            "",
            trace,
            &format!("{trace}-{span}-2"),
            &format!("{trace}-{span}-1-zz"),
            &format!("{trace}-{span}-1-05e3ac9a4f6e3b90-x"),
            &format!("{}-{span}", trace.to_uppercase()),
            &format!("00000000000000000000000000000000-{span}"),
            &format!("{trace}-0000000000000000"),
            &format!("{trace}-{span}0"),
        ] {
            assert!(parse_b3_single(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_tracestate_that_fits_is_kept_as_it_is() {
        for fits in [
            "",
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
        ] {
            assert!(matches!(bounded_tracestate(fits), Cow::Borrowed(b) if b == fits));
        }
        let full = format!("a={}", "x".repeat(MAX_TRACESTATE_BYTES - 2));
        assert_eq!(bounded_tracestate(&full), full);
    }

    #[test]
    fn a_long_tracestate_loses_its_long_members_then_its_last_ones() {
        // 32 members of 507 bytes each (16 KiB, what the SDK itself accepts): none is kept.
        let flood: String = (0..32)
            .map(|i| format!("k{i:02}{}={}", "a".repeat(250), "v".repeat(253)))
            .collect::<Vec<_>>()
            .join(",");
        assert!(flood.len() > 16_000);
        assert_eq!(bounded_tracestate(&flood), "");
        // Short members are kept in order, up to the bound; the long one goes first.
        let long = format!("long={}", "v".repeat(200));
        // 60 members of 11 bytes: 42 would fit in 512 with their commas, but a list holds 32.
        let members: Vec<String> = (0..60).map(|i| format!("m{i:02}=value{i:02}")).collect();
        let text = format!("{} , {long},\t{}", members[0], members[1..].join(","));
        let bounded = bounded_tracestate(&text);
        assert!(bounded.len() <= MAX_TRACESTATE_BYTES, "{}", bounded.len());
        let kept: Vec<&str> = bounded.split(',').collect();
        assert_eq!(
            kept,
            members[..kept.len()]
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        assert_eq!(kept.len(), MAX_TRACESTATE_MEMBERS);
        // Members of 30 bytes: 16 fit in 512 bytes, before the count is reached.
        let wide: Vec<String> = (0..40)
            .map(|i| format!("w{i:02}={}", "x".repeat(26)))
            .collect();
        let text = wide.join(",");
        assert_eq!(bounded_tracestate(&text), wide[..16].join(","));
    }

    #[test]
    fn a_bounded_tracestate_is_what_the_parent_carries() {
        let traceparent = "00-80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-01";
        let flood = format!("big={}", "v".repeat(4000));
        let headers = |name: &str| match name {
            "traceparent" => Some(traceparent),
            "tracestate" => Some(flood.as_str()),
            _ => None,
        };
        let parent = w3c_parent(&headers).expect("a valid parent");
        assert!(parent.is_sampled());
        assert_eq!(parent.trace_state().header(), "");
        let small = |name: &str| match name {
            "traceparent" => Some(traceparent),
            "tracestate" => Some("congo=t61rcWkgMzE"),
            _ => None,
        };
        assert_eq!(
            w3c_parent(&small).unwrap().trace_state().header(),
            "congo=t61rcWkgMzE"
        );
    }

    #[test]
    fn nothing_is_read_while_traces_are_off() {
        // `init` is never called in unit tests: the parent is not even looked for.
        let asked = std::cell::Cell::new(0);
        let parent = parent(|_| {
            asked.set(asked.get() + 1);
            Some("00-80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-01")
        });
        assert!(parent.is_none());
        assert_eq!(asked.get(), 0);
    }
}
