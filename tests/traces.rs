//! OpenTelemetry traces through the real parts: a real OTLP/gRPC receiver (the collector's
//! `TraceService`, served here with tonic from the `opentelemetry-proto` definitions) receives the
//! spans of the real `stepgate` binary and of the real Envoy (its OpenTelemetry tracer), and the
//! test checks that stepgate's decision span sits under Envoy's ext_authz span in the same trace,
//! with the attributes it promises and never a token. A caller's oversized `tracestate` is not
//! carried (so a batch stays within what a collector accepts), and a failed export is logged.

mod common;
#[path = "common/envoy.rs"]
mod envoy;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Server, Spawn, demo_policy_path, envoy_check, mint, oidc};
use envoy::{ENVOY_YAML, Echo, Envoy};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value::Value},
    trace::v1::Span,
};
use stepgate::api::v1::{
    DecideRequest, decide_request::Credential, decision_service_client::DecisionServiceClient,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// How long spans may take to arrive: both exporters batch (stepgate's SDK and Envoy flush every
/// 5 s by default).
const SPAN_DEADLINE: Duration = Duration::from_secs(30);

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .map(any_value_text)
    }
}

fn any_value_text(value: &AnyValue) -> String {
    match &value.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// The OTLP/gRPC receiver: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(any_value_text)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        Self::start_with(None).await
    }

    /// As [`Receiver::start`], over TLS with `identity` (a certificate for 127.0.0.1).
    async fn start_with(identity: Option<tonic::transport::Identity>) -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Self::default();
        let service = TraceServiceServer::new(receiver.clone());
        let mut server = tonic::transport::Server::builder();
        if let Some(identity) = identity {
            server = server
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .expect("a TLS configuration");
        }
        tokio::spawn(async move {
            server
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .expect("the OTLP receiver runs");
        });
        (receiver, addr)
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `found` picks something out of the spans received so far.
    async fn wait_for<T>(&self, what: &str, found: impl Fn(&[Received]) -> Option<T>) -> T {
        let deadline = Instant::now() + SPAN_DEADLINE;
        loop {
            if let Some(t) = found(&self.spans()) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {SPAN_DEADLINE:?}; received: {:#?}",
                self.spans()
                    .iter()
                    .map(|r| (&r.service, &r.span.name, hex(&r.span.trace_id)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stepgate_with_traces(receiver: SocketAddr) -> Server {
    Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: vec!["--otlp-endpoint".into(), format!("http://{receiver}")],
            ..Spawn::default()
        },
    )
}

/// A collector behind a private CA: an https endpoint, trusted through the standard
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`, with the endpoint and sampler from the standard variables
/// too (no flag).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_collector_over_tls_trusting_its_private_ca() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    // The receiver's TLS (tonic, rustls): aws-lc, as stepgate itself installs.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    let identity = tonic::transport::Identity::from_pem(cert.pem(), key.serialize_pem());
    let (receiver, addr) = Receiver::start_with(Some(identity)).await;

    let ca_file = std::env::temp_dir().join(format!("stepgate-otlp-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            env: vec![
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                    format!("https://{addr}"),
                ),
                (
                    "OTEL_EXPORTER_OTLP_CERTIFICATE".into(),
                    ca_file.display().to_string(),
                ),
                ("OTEL_TRACES_SAMPLER".into(), "always_on".into()),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
            ],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let token = mint(&oidc(&[], None, &[]));
    decide_reports(
        &mut DecisionServiceClient::new(server.channel().await),
        &token,
    )
    .await;
    let span = receiver
        .wait_for("a decision span over TLS", |spans| {
            spans
                .iter()
                .find(|r| r.service == "stepgate" && r.span.name == "stepgate Decide")
                .cloned()
        })
        .await;
    assert!(
        span.span.parent_span_id.is_empty(),
        "a root: no parent was sent"
    );
    assert_eq!(span.attribute("stepgate.outcome").as_deref(), Some("ALLOW"));
    assert_no_token(&receiver.spans(), &token);
    let _ = std::fs::remove_file(&ca_file);
}

/// Envoy's example config with its OpenTelemetry tracer on, every request sampled, exporting to
/// the receiver through an `otlp` cluster.
fn tracing_edits(receiver: SocketAddr) -> [(&'static str, String); 2] {
    let tracing = "stat_prefix: ingress\n                \
        tracing:\n                  \
          random_sampling: { value: 100 }\n                  \
          provider:\n                    \
            name: envoy.tracers.opentelemetry\n                    \
            typed_config:\n                      \
              \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig\n                      \
              grpc_service: { envoy_grpc: { cluster_name: otlp }, timeout: 1s }\n                      \
              service_name: envoy\n";
    let cluster = format!(
        "    - name: otlp\n      \
           type: STATIC\n      \
           connect_timeout: 1s\n      \
           typed_extension_protocol_options:\n        \
             envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n          \
               \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n          \
               explicit_http_config: {{ http2_protocol_options: {{}} }}\n      \
           load_assignment:\n        \
             cluster_name: otlp\n        \
             endpoints:\n          \
               - lb_endpoints:\n              \
                   - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}\n\n    \
         - name: upstream\n",
        receiver.port()
    );
    [
        ("stat_prefix: ingress\n", tracing.to_owned()),
        ("    - name: upstream\n", cluster),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_span_is_a_child_of_envoys_ext_authz_span() {
    let (receiver, receiver_addr) = Receiver::start().await;
    let server = stepgate_with_traces(receiver_addr);
    server.wait_ready().await;
    let echo = Echo::start().await;
    let edits = tracing_edits(receiver_addr);
    let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let envoy = Envoy::start_edited(ENVOY_YAML, server.port, echo.port, &edits).await;

    let token = mint(&oidc(&[], None, &[]));
    let response = reqwest::Client::new()
        .get(envoy.url("/reports/q3"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("a request through Envoy");
    assert_eq!(response.status(), 200, "allowed by the demo policy");

    // stepgate's decision span, then Envoy's span it names as its parent.
    let decision = receiver
        .wait_for("stepgate decision span", |spans| {
            spans
                .iter()
                .find(|r| r.service == "stepgate" && r.span.name == "stepgate Check")
                .cloned()
        })
        .await;
    let parent = receiver
        .wait_for("Envoy span that is the decision's parent", |spans| {
            spans
                .iter()
                .find(|r| r.service == "envoy" && r.span.span_id == decision.span.parent_span_id)
                .cloned()
        })
        .await;
    assert_eq!(
        hex(&parent.span.trace_id),
        hex(&decision.span.trace_id),
        "one trace"
    );
    assert!(
        parent
            .span
            .name
            .contains("envoy.service.auth.v3.Authorization")
            || parent.span.name.contains("ext_authz"),
        "the parent is Envoy's ext_authz call span, got {:?}",
        parent.span.name
    );
    // Envoy's ingress span is in the same trace too (the request's root).
    let ingress = receiver
        .wait_for("Envoy ingress span", |spans| {
            spans
                .iter()
                .find(|r| {
                    r.service == "envoy"
                        && r.span.trace_id == decision.span.trace_id
                        && r.span.parent_span_id.is_empty()
                })
                .cloned()
        })
        .await;
    assert_eq!(
        parent.span.parent_span_id, ingress.span.span_id,
        "ext_authz span under the ingress span"
    );

    assert_eq!(
        decision.attribute("stepgate.door").as_deref(),
        Some("check")
    );
    assert_eq!(
        decision.attribute("stepgate.outcome").as_deref(),
        Some("ALLOW")
    );
    assert_eq!(
        decision.attribute("stepgate.reason").as_deref(),
        Some("allowed")
    );
    assert_eq!(
        decision.attribute("stepgate.http_status").as_deref(),
        Some("200")
    );
    assert_eq!(
        decision.attribute("stepgate.issuer_id").as_deref(),
        Some("demo-oidc")
    );
    assert!(
        decision.attribute("stepgate.rule").is_some(),
        "{decision:?}"
    );
    assert!(
        decision.attribute("stepgate.token_cache_hit").is_some(),
        "{decision:?}"
    );
    assert_no_token(&receiver.spans(), &token);
}

/// Without Envoy: `Decide` takes its parent from W3C `traceparent` in its gRPC metadata, `Check`
/// from B3 headers in its metadata or, failing that, from the checked request's own headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_come_from_grpc_metadata_then_from_the_request_headers() {
    let (receiver, receiver_addr) = Receiver::start().await;
    let server = stepgate_with_traces(receiver_addr);
    server.wait_ready().await;
    let token = mint(&oidc(&[], None, &[]));

    let w3c_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let w3c_parent = "00f067aa0ba902b7";
    let mut decide = tonic::Request::new(DecideRequest {
        credential: Some(Credential::Token(token.clone())),
        operation: "reports.read".into(),
        ..Default::default()
    });
    decide.metadata_mut().insert(
        "traceparent",
        format!("00-{w3c_trace}-{w3c_parent}-01").parse().unwrap(),
    );
    DecisionServiceClient::new(server.channel().await)
        .decide(decide)
        .await
        .expect("Decide answers");

    // B3 (Envoy's Zipkin tracer) in the metadata of a Check.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let b3_parent = "e457b5a2e4d86bd1";
    let bearer = format!("Bearer {token}");
    let headers = [("authorization", bearer.as_str())];
    let mut check = tonic::Request::new(envoy_check("GET", "app.example", "/reports/q3", &headers));
    for (name, value) in [
        ("x-b3-traceid", b3_trace),
        ("x-b3-spanid", b3_parent),
        ("x-b3-sampled", "1"),
    ] {
        check.metadata_mut().insert(name, value.parse().unwrap());
    }
    let mut authz = AuthorizationClient::new(server.channel().await);
    authz.check(check).await.expect("Check answers");

    // A Check with no metadata: the client's own traceparent, in the checked request.
    let header_trace = "0af7651916cd43dd8448eb211c80319c";
    let header_parent = "b7ad6b7169203331";
    let mut request = envoy_check("GET", "app.example", "/reports/q3", &headers);
    request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("an HTTP request")
        .headers
        .insert(
            "traceparent".into(),
            format!("00-{header_trace}-{header_parent}-01"),
        );
    authz.check(request).await.expect("Check answers");

    for (door, trace, parent) in [
        ("stepgate Decide", w3c_trace, w3c_parent),
        ("stepgate Check", b3_trace, b3_parent),
        ("stepgate Check", header_trace, header_parent),
    ] {
        let span = receiver
            .wait_for(&format!("{door} span in trace {trace}"), |spans| {
                spans
                    .iter()
                    .find(|r| r.span.name == door && hex(&r.span.trace_id) == trace)
                    .cloned()
            })
            .await;
        assert_eq!(hex(&span.span.parent_span_id), parent, "{span:?}");
    }

    // Background work has its spans: the start-up key loads, and a reload on SIGHUP.
    for issuer in ["demo-entra", "demo-oidc"] {
        let load = receiver
            .wait_for(&format!("key load span of {issuer}"), |spans| {
                spans
                    .iter()
                    .find(|r| {
                        r.span.name == "stepgate key load"
                            && r.attribute("stepgate.issuer_id").as_deref() == Some(issuer)
                    })
                    .cloned()
            })
            .await;
        assert_eq!(
            load.attribute("stepgate.trigger").as_deref(),
            Some("scheduled")
        );
    }
    server.signal("HUP");
    let reload = receiver
        .wait_for("policy reload span", |spans| {
            spans
                .iter()
                .find(|r| r.span.name == "stepgate policy reload")
                .cloned()
        })
        .await;
    assert_eq!(
        reload.attribute("stepgate.trigger").as_deref(),
        Some("SIGHUP")
    );
    assert_no_token(&receiver.spans(), &token);
}

/// A caller that reaches `Check` may send any `traceparent` and a `tracestate` of 32 members of
/// 512 bytes (16 KiB, what the W3C format allows). The span stepgate makes under it does not
/// carry that `tracestate` (one over 512 bytes loses its members over 128 bytes, then its last
/// ones): with it, 300 such spans made a batch over the receiver's 4 MiB, refused whole with
/// every legitimate span in it. A short `tracestate` is carried as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_oversized_tracestate_is_dropped_and_legitimate_spans_arrive() {
    const FLOOD: usize = 300;
    const LEGITIMATE: usize = 30;
    let (receiver, receiver_addr) = Receiver::start().await;
    let server = stepgate_with_traces(receiver_addr);
    server.wait_ready().await;
    let flood_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let legit_trace = "11111111111111111111111111111111";
    let small_trace = "22222222222222222222222222222222";
    let flood_state: String = (0..32)
        .map(|i| format!("k{i:02}{}={}", "a".repeat(250), "v".repeat(256)))
        .collect::<Vec<_>>()
        .join(",");
    assert!(flood_state.len() > 16_000);

    // Interleaved, as the end users' own headers of the checked requests (where Envoy leaves
    // them), over a few connections at once.
    let mut calls = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let channel = server.channel().await;
        let flood_state = flood_state.clone();
        calls.spawn(async move {
            let mut authz = AuthorizationClient::new(channel);
            for i in (worker..FLOOD + LEGITIMATE).step_by(4) {
                let legit = i % 11 == 0 && i / 11 < LEGITIMATE;
                let (trace, state) = if legit {
                    (legit_trace, None)
                } else {
                    (flood_trace, Some(flood_state.as_str()))
                };
                let traceparent = format!("00-{trace}-{:016x}-01", i + 1);
                let mut headers = vec![("traceparent", traceparent.as_str())];
                headers.extend(state.map(|s| ("tracestate", s)));
                authz
                    .check(envoy_check("GET", "app.example", "/healthz", &headers))
                    .await
                    .expect("Check answers");
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap();
    }
    let small = format!("00-{small_trace}-00f067aa0ba902b7-01");
    AuthorizationClient::new(server.channel().await)
        .check(envoy_check(
            "GET",
            "app.example",
            "/healthz",
            &[
                ("traceparent", small.as_str()),
                ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
            ],
        ))
        .await
        .expect("Check answers");

    let of_trace = |spans: &[Received], trace: &str| -> Vec<Received> {
        spans
            .iter()
            .filter(|r| r.span.name == "stepgate Check" && hex(&r.span.trace_id) == trace)
            .cloned()
            .collect()
    };
    let legit_sent = (0..FLOOD + LEGITIMATE)
        .filter(|i| i % 11 == 0 && i / 11 < LEGITIMATE)
        .count();
    receiver
        .wait_for("every legitimate span", |spans| {
            (of_trace(spans, legit_trace).len() == legit_sent).then_some(())
        })
        .await;
    let flood = receiver
        .wait_for("every span of the flood", |spans| {
            let flood = of_trace(spans, flood_trace);
            (flood.len() == FLOOD + LEGITIMATE - legit_sent).then_some(flood)
        })
        .await;
    assert!(
        flood.iter().all(|r| r.span.trace_state.is_empty()),
        "a flood span carries {} bytes of tracestate",
        flood
            .iter()
            .map(|r| r.span.trace_state.len())
            .max()
            .unwrap_or(0)
    );
    let small = receiver
        .wait_for("the span with a short tracestate", |spans| {
            of_trace(spans, small_trace).pop()
        })
        .await;
    assert_eq!(
        small.span.trace_state,
        "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    );
    assert!(
        !server.logs_text().contains("exporting spans"),
        "an export failed:\n{}",
        server.logs_text()
    );
}

/// A collector that refuses every export, and counts them.
#[derive(Debug, Clone, Default)]
struct Refusing {
    exports: Arc<Mutex<usize>>,
    /// Spans in the exports refused.
    spans: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl TraceService for Refusing {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        *self.spans.lock().unwrap() += spans;
        *self.exports.lock().unwrap() += 1;
        Err(tonic::Status::resource_exhausted(
            "grpc: received message larger than max",
        ))
    }
}

/// The SDK drops a batch it could not export without a word; stepgate says so, once a minute
/// at most, with how many exports and spans were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_export_is_logged_once_a_minute_at_most() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refusing = Refusing::default();
    let service = TraceServiceServer::new(refusing.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .expect("the refusing receiver runs");
    });
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: vec!["--otlp-endpoint".into(), format!("http://{addr}")],
            env: vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into())],
            metrics: true,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let is_warning = |l: &serde_json::Value| {
        l["level"] == "WARN"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("exporting spans to the OTLP collector failed"))
    };
    let token = mint(&oidc(&[], None, &[]));
    let mut decide = DecisionServiceClient::new(server.channel().await);
    let mut exports_seen = 0;
    for round in 0..3 {
        decide_reports(&mut decide, &token).await;
        let deadline = Instant::now() + SPAN_DEADLINE;
        while *refusing.exports.lock().unwrap() <= exports_seen {
            assert!(
                Instant::now() < deadline,
                "no export tried in round {round}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        exports_seen = *refusing.exports.lock().unwrap();
    }
    let warning = server
        .wait_for_log(Duration::from_secs(10), is_warning)
        .await
        .unwrap_or_else(|| panic!("no warning:\n{}", server.logs_text()));
    assert_eq!(warning["failed_exports"], 1, "{warning}");
    assert!(warning["spans_lost"].as_u64() >= Some(1), "{warning}");
    assert!(warning["error"].as_str().is_some(), "{warning}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warnings = server.json_logs().into_iter().filter(is_warning).count();
    assert_eq!(warnings, 1, "{}", server.logs_text());
    // Every lost span is counted, the ones the warning did not report too.
    let refused = *refusing.spans.lock().unwrap();
    assert!(refused >= 3, "{refused} spans refused");
    let metrics = server.scrape().await;
    let counted = format!("stepgate_trace_spans_export_failed_total {refused}");
    assert!(
        metrics.lines().any(|l| l == counted),
        "{counted}\n{metrics}"
    );
}

/// One `Decide` of `reports.read` with `token` on `client`.
async fn decide_reports(
    client: &mut DecisionServiceClient<tonic::transport::Channel>,
    token: &str,
) {
    client
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.to_owned())),
            operation: "reports.read".into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers");
}

/// No attribute of any span holds the token or any of its three parts.
fn assert_no_token(spans: &[Received], token: &str) {
    let parts: Vec<&str> = token.split('.').filter(|p| p.len() > 8).collect();
    for r in spans {
        for kv in &r.span.attributes {
            let value = kv.value.as_ref().map(any_value_text).unwrap_or_default();
            for part in &parts {
                assert!(
                    !value.contains(part),
                    "span {:?} attribute {} carries the token",
                    r.span.name,
                    kv.key
                );
            }
        }
    }
}
