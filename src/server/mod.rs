//! The gRPC server: ext_authz `Check`, `Decide`, gRPC health and reflection on one port; key
//! refresh and policy reload in the background; graceful shutdown.

pub mod admin;
pub mod answer;
pub mod authorizer;
mod calls;
mod catch_panic;
pub mod check_callers;
pub mod check_request;
mod conn;
pub(crate) use conn::{Frames, MAX_SETTINGS, Sources};
pub mod decide;
pub mod ext_authz;
mod files;
pub mod grpc_message;
mod reload;
pub mod tls;
mod workers;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic_health::{ServingStatus, server::HealthReporter};

pub use authorizer::Authorizer;
pub use conn::{ListenerKind, PeerInfo};
pub use tls::TlsSettings;

use crate::{
    api::{
        self,
        v1::{
            admin_service_server::AdminServiceServer,
            decision_service_server::DecisionServiceServer,
        },
    },
    identity::keys,
    policy::Policy,
    telemetry::{metrics, traces},
};

/// How `stepgate serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// Time between reporting NOT_SERVING and closing the listener on shutdown, so that load
    /// balancers stop sending new calls first.
    pub drain_delay: Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None` turns them off.
    pub metrics_listen: Option<SocketAddr>,
    pub ready_when: ReadyWhen,
    pub limits: TransportLimits,
    /// Reload the policy when its file changes (besides SIGHUP).
    pub watch_config: bool,
    /// Serve a policy trusting the bundled demo keys on a listener beyond loopback.
    pub allow_demo_keys: bool,
    /// TLS (and mutual TLS) on the gRPC listeners; `None`: plaintext.
    pub tls: Option<TlsSettings>,
    /// A second gRPC listener, where the policy may allow `explain`.
    pub admin_listen: Option<SocketAddr>,
    /// Serve gRPC server reflection.
    pub reflection: bool,
    /// Export traces to this OTLP/gRPC endpoint (the standard `OTEL_*` variables also turn
    /// traces on; see [`crate::telemetry::traces`]).
    pub otlp_endpoint: Option<String>,
    /// The shared risk store, over the policy's `risk.store` (a URL with a password stays out of
    /// the policy file).
    pub risk_store: Option<crate::risk::signals::StoreSpec>,
    /// Write decision records here (`-`: stdout) whatever the policy's `records.enabled`.
    pub records: Option<PathBuf>,
    /// Serving threads, each with its own runtime and its own share of the connections
    /// (`workers`); the calling runtime is the first.
    pub workers: usize,
    /// Who may call `Check` (`--check-from`, `--check-client-san`).
    pub check_callers: check_callers::CheckCallers,
}

/// Bounds on what one client can hold of the gRPC listener. Past them a call is refused at the
/// transport (a `Check` frame over the size is answered `413` instead, see `ext_authz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportLimits {
    /// Largest `Check` message read.
    pub max_message_bytes: usize,
    /// Largest `Decide` message read: smaller, since its attributes arrive as a protobuf
    /// `Struct` that takes many times its size once decoded.
    pub max_decide_message_bytes: usize,
    /// Concurrent calls (HTTP/2 streams) per connection.
    pub max_concurrent_streams: u32,
    /// Open connections; further clients wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Open connections from one source address; past it a new one is closed on accept. 0: no
    /// bound but `max_connections`.
    pub max_connections_per_source: usize,
    /// Longest a call may take, reading its request included (a client's shorter `grpc-timeout`
    /// wins); past it the call ends with `CANCELLED`.
    pub request_timeout: Duration,
    /// Time a new connection has to send its first bytes before it is closed.
    pub handshake_timeout: Duration,
    /// Bytes of unfinished request messages the process holds at most, over every call: a
    /// `Check` that would take more is answered `503 overloaded`, any other call ends with
    /// `RESOURCE_EXHAUSTED`.
    pub max_buffered_bytes: usize,
    /// A connection with no call for this long (between one and two of it) is told to go away.
    pub idle_timeout: Duration,
    /// A connection open this long (give or take a tenth, so that many do not go at once) is
    /// told to go away, however busy. Zero: never.
    pub max_connection_age: Duration,
}

impl Default for TransportLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_decide_message_bytes: 256 * 1024,
            max_concurrent_streams: 100,
            max_connections: 10_000,
            max_connections_per_source: 100,
            request_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_buffered_bytes: 64 * 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
            max_connection_age: Duration::from_secs(30 * 60),
        }
    }
}

/// When gRPC health reports SERVING.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadyWhen {
    /// Every issuer has keys (the default: no issuer's users are refused because of a cold start).
    AllIssuers,
    /// At least one issuer has keys (for deployments where one identity provider may be down).
    AnyIssuer,
    /// As soon as the server listens (tokens of issuers without keys are refused meanwhile).
    Always,
}

/// Serves until SIGTERM or SIGINT. `policy` is the already compiled policy of `options.config`.
pub async fn run(options: ServeOptions, policy: Policy) -> anyhow::Result<()> {
    if traces::init(options.otlp_endpoint.as_deref()).map_err(|e| anyhow::anyhow!(e))? {
        tracing::info!(
            endpoint = options.otlp_endpoint.as_deref().map_or_else(
                || "(from OTEL_* variables)".to_owned(),
                crate::telemetry::url_shown
            ),
            "exporting traces over OTLP/gRPC"
        );
    }
    let http = keys::http_client();
    let issuers: Vec<_> = policy.issuers.iter().cloned().collect();
    let without_keys = keys::load_all(&issuers, &http).await;
    let exposed = exposed_listener(&options);
    let demo = demo_key_issuers(&policy);
    if !demo.is_empty()
        && let (Some(address), false) = (exposed, options.allow_demo_keys)
    {
        anyhow::bail!(
            "issuer(s) {} trust the demo keys (examples/demo-keys), whose private keys are \
                 published: anyone can mint the tokens they accept. Serving them on {address}, \
                 beyond this machine, is refused; use your identity provider's keys, listen on \
                 127.0.0.1, or pass --allow-demo-keys (STEPGATE_ALLOW_DEMO_KEYS=true) to try the demo \
                 from elsewhere",
            demo.join(", ")
        );
    }
    // From now on, a key set holding a demo key is refused wherever it comes from.
    keys::refuse_demo_keys(exposed.filter(|_| !options.allow_demo_keys));
    if !without_keys.is_empty() {
        tracing::warn!(
            issuers = ?without_keys,
            "serving without keys for some issuers: their tokens are refused (unknown_kid) and health \
             reports NOT_SERVING until the keys load"
        );
    }
    let store = options
        .risk_store
        .clone()
        .unwrap_or_else(|| policy.risk.store.clone());
    if store != crate::risk::signals::StoreSpec::Memory {
        tracing::info!(
            store = %store.redacted(),
            on_store_failure = ?policy.risk.on_store_failure,
            "sharing blocks, revocations and risk counters through Redis"
        );
    }
    let authorizer = Authorizer::start(Arc::new(policy), options.risk_store.clone());
    {
        let policy = authorizer.policy();
        if options.records.is_some() || policy.records.enabled {
            let path = match &options.records {
                Some(p) if p.as_os_str() == "-" => None,
                Some(p) => Some(p.clone()),
                None => policy.records.path.clone(),
            };
            let sink = crate::telemetry::records::RecordSink::open(
                path.as_deref(),
                policy.records.max_bytes,
                policy.records.keep,
            )
            .with_context(|| {
                format!(
                    "cannot open the decision records file {}",
                    path.as_deref()
                        .map_or("-".into(), |p| p.display().to_string())
                )
            })?;
            tracing::info!(
                to = sink.target(),
                allow_sample = f64::from(policy.records.allow_sample_ppm) / 1e6,
                "writing decision records"
            );
            authorizer.set_records(sink, options.records.is_some());
        }
    }
    let signals_of = Arc::downgrade(&authorizer);
    metrics::global().set_risk_keys_source(Box::new(move || {
        signals_of.upgrade().map_or_else(Vec::new, |authorizer| {
            let policy = authorizer.policy();
            policy
                .risk
                .signals
                .iter()
                .map(|s| {
                    let table = s.table();
                    (Arc::clone(&s.name), table.len(), table.capacity())
                })
                .collect()
        })
    }));
    let (health, health_service) = tonic_health::server::health_reporter();
    // A health request names a service: a message announcing more is refused before tonic
    // reserves what the prefix announces (4 MiB at its default, which no budget charged).
    let health_service = health_service.max_decoding_message_size(MAX_HEALTH_MESSAGE_BYTES);
    // tonic-health starts the server as SERVING; nothing is ready until the readiness task says so.
    set_all(&health, ServingStatus::NotServing).await;
    // For liveness probes: SERVING as long as the process answers calls, whether or not it has
    // keys or is draining. A liveness probe on the readiness status would restart every replica
    // when an identity provider stays down past `max_stale`, wiping what is held in memory.
    health
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    let (stop_tx, stop_rx) = watch::channel(false);

    // Signal handlers are installed before the listening line is logged, so a signal sent right
    // after it is handled rather than killing the process.
    let signals = Signals::install().context("installing signal handlers")?;
    let refresh_stop = reload::spawn(
        signals.hangup,
        Arc::clone(&authorizer),
        options.config.clone(),
        http.clone(),
        options.watch_config,
        stop_rx.clone(),
    );
    keys::spawn_refresh(issuers, http, refresh_stop);
    tokio::spawn(report_readiness(
        Arc::clone(&authorizer),
        options.ready_when,
        health.clone(),
        stop_rx.clone(),
    ));

    // Both versions of the reflection API: grpcurl before 1.8.8 (and other older clients) ask
    // only v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(api::ENVOY_AUTH_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_v1alpha) = if options.reflection {
        (
            Some(
                reflection_builder()
                    .build_v1()
                    .context("building the reflection service")?
                    .max_decoding_message_size(MAX_REFLECTION_MESSAGE_BYTES),
            ),
            Some(
                reflection_builder()
                    .build_v1alpha()
                    .context("building the reflection service (v1alpha)")?
                    .max_decoding_message_size(MAX_REFLECTION_MESSAGE_BYTES),
            ),
        )
    } else {
        (None, None)
    };

    let tls = match options.tls {
        Some(settings) => {
            let tls = tls::Tls::load(settings).map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
            tls.spawn_reload(stop_rx.clone());
            Some(tls)
        }
        None => None,
    };

    if let Some(addr) = options.metrics_listen {
        let listener = metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "metrics listening on http://{local}/metrics");
        tokio::spawn(metrics::serve(listener));
    }

    let limits = options.limits;
    let (dispatch, queues) = conn::Dispatch::new(options.workers);
    let dispatch = Arc::new(dispatch);
    metrics::global().set_worker_connections(dispatch.loads());
    // Turned true after the drain delay: the listeners close and each worker stops taking
    // connections, finishing the calls in flight.
    let (closing_tx, closing) = watch::channel(false);
    let accept = |listener, kind| {
        let options = conn::AcceptOptions {
            max: limits.max_connections,
            max_per_source: limits.max_connections_per_source,
            kind,
        };
        conn::accept(listener, options, Arc::clone(&dispatch), closing.clone());
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let local = listener.local_addr()?;
    if let Some(addr) = options.admin_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--admin-listen)"))?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "admin listener on {scheme}://{local}");
        accept(listener, ListenerKind::Admin);
    }
    // Accepted connections wait in their worker's queue until the worker runs (just below).
    accept(listener, ListenerKind::Main);

    // The admin API exists only with an admin listener; its handlers refuse the main one.
    let admin_service = options.admin_listen.map(|_| {
        AdminServiceServer::new(admin::Admin::new(Arc::clone(&authorizer)))
            .max_decoding_message_size(64 * 1024)
    });
    let worker_options = conn::WorkerOptions {
        handshake_timeout: limits.handshake_timeout,
        tls: tls.clone(),
    };
    // One budget for the whole process: charged by `Check` bodies that arrive in pieces, and by
    // every body tonic's router reads.
    let budget = grpc_message::Budget::new(limits.max_buffered_bytes);
    let check_callers = Arc::new(options.check_callers.clone());
    if !check_callers.is_open() {
        tracing::info!(
            check_from = %check_callers.networks_text(),
            check_client_san = %check_callers.client_sans_text(),
            "Check answers only the listed callers"
        );
    }
    let records_of = Arc::clone(&authorizer);
    let serve = Arc::new(move |queue| {
        let incoming = conn::incoming(queue, worker_options.clone());
        // The hot services are made for each worker: the reference counts their calls clone are
        // then the worker's own (see `authorizer::WorkerHandle`).
        let ext_authz = ext_authz::ExtAuthz::new(
            Arc::clone(&authorizer),
            limits.max_message_bytes,
            Arc::clone(&budget),
        );
        let decide = DecisionServiceServer::new(decide::Decide::new(Arc::clone(&authorizer)))
            .max_decoding_message_size(limits.max_decide_message_bytes);
        let closing = closing.clone();
        let mut routes = tonic::service::Routes::builder();
        routes
            .add_service(health_service.clone())
            .add_service(decide);
        if let Some(reflection) = reflection.clone() {
            routes.add_service(reflection);
        }
        if let Some(reflection) = reflection_v1alpha.clone() {
            routes.add_service(reflection);
        }
        if let Some(admin) = admin_service.clone() {
            routes.add_service(admin);
        }
        let calls = calls::Calls {
            check: ext_authz,
            decide: calls::DecideReading {
                authorizer: Arc::clone(&authorizer),
                max_message_bytes: limits.max_decide_message_bytes,
            },
            routes: routes.routes().prepare(),
            timeout: limits.request_timeout,
            budget: Arc::clone(&budget),
            check_callers: Arc::clone(&check_callers),
        };
        async move {
            calls::serve(incoming, calls, &limits, closing).await;
            Ok(())
        }
    });
    let (first, workers) = workers::start(queues, Arc::clone(&serve))?;
    // What took effect, flags given again (the chart's extraArgs) included.
    tracing::info!(
        addr = %local,
        tls = tls.is_some(),
        mutual_tls = tls.as_ref().is_some_and(|t| t.mutual()),
        client_san = tls
            .as_ref()
            .filter(|t| t.mutual())
            .map(|t| tracing::field::display(t.client_sans_text())),
        workers = options.workers.max(1),
        max_connections = limits.max_connections,
        max_connections_per_source = limits.max_connections_per_source,
        max_concurrent_streams = limits.max_concurrent_streams,
        "stepgate listening on {local}"
    );
    tokio::spawn(async move {
        shutdown(signals.terminate, health, options.drain_delay, stop_tx).await;
        let _ = closing_tx.send(true);
    });
    let served = serve(first).await;
    let others = workers.finish().await;
    // Every call has ended: the records of their decisions are written before the process is.
    let _ = tokio::task::spawn_blocking(move || records_of.finish_records()).await;
    served.and(others)?;
    // The batch exporter blocks while it sends what is pending.
    let _ = tokio::task::spawn_blocking(traces::shutdown).await;
    tracing::info!("stepgate stopped");
    Ok(())
}

/// The first listener deciding or administering that is reachable beyond this machine.
fn exposed_listener(options: &ServeOptions) -> Option<SocketAddr> {
    std::iter::once(options.listen)
        .chain(options.admin_listen)
        .find(|address| !address.ip().to_canonical().is_loopback())
}

/// The ids of the issuers of `policy` that trust a bundled demo key.
fn demo_key_issuers(policy: &Policy) -> Vec<String> {
    policy
        .issuers
        .iter()
        .filter(|issuer| issuer.keys().has_demo_key())
        .map(|issuer| issuer.id.to_string())
        .collect()
}

/// SERVING once the issuers of the current policy have keys as `ready_when` asks and, with a
/// Redis risk store, once the shared blocks and revocations have been read (a replica started
/// while Redis is down would serve every blocked subject and revoked session); NOT_SERVING
/// otherwise (also later, if keys are dropped after `max_stale`; a store lost after its first
/// reading keeps its last known state, `risk.on_store_failure`). Looks again whenever a key set
/// or the policy is replaced, or the store is first read.
async fn report_readiness(
    authorizer: Arc<Authorizer>,
    ready_when: ReadyWhen,
    health: HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = crate::identity::issuer::key_set_changes();
    let mut last = None;
    loop {
        changes.mark_unchanged();
        let ready = {
            let policy = authorizer.policy();
            let mut with_keys = policy.issuers.iter().map(|i| !i.keys().is_empty());
            let keys = match ready_when {
                ReadyWhen::AllIssuers => with_keys.all(|has| has),
                ReadyWhen::AnyIssuer => with_keys.any(|has| has),
                ReadyWhen::Always => true,
            };
            keys && (ready_when == ReadyWhen::Always || authorizer.risk().synced())
        };
        if last != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            tracing::info!(ready, "health {status:?}");
            set_all(&health, status).await;
            last = Some(ready);
        }
        // Woken when a key set or the policy is replaced, not by a timer: an idle server sleeps.
        tokio::select! {
            _ = changes.changed() => {}
            _ = stop.changed() => return,
        }
    }
}

/// The gRPC health service name that reports SERVING for as long as the process answers calls.
pub const LIVENESS_SERVICE: &str = "liveness";

/// The largest health request (`grpc.health.v1.HealthCheckRequest`: a service name).
const MAX_HEALTH_MESSAGE_BYTES: usize = 1024;
/// The largest reflection request: a host and a file or symbol name. tonic-reflection writes the
/// host into each answer twice, and a client that takes no answers keeps them: at tonic's 4 MiB
/// default, about 100 MiB per connection.
const MAX_REFLECTION_MESSAGE_BYTES: usize = 16 * 1024;

async fn set_all(health: &HealthReporter, status: ServingStatus) {
    for service in [
        "",
        "envoy.service.auth.v3.Authorization",
        "stepgate.v1.DecisionService",
    ] {
        health.set_service_status(service, status).await;
    }
}

/// Resolves on SIGTERM or SIGINT after health went NOT_SERVING and the drain delay passed; the
/// server then stops accepting and lets in-flight calls finish.
async fn shutdown(
    terminate: Terminate,
    health: HealthReporter,
    drain_delay: Duration,
    stop: watch::Sender<bool>,
) {
    terminate.wait().await;
    tracing::info!("shutting down: health NOT_SERVING, finishing in-flight calls");
    let _ = stop.send(true);
    set_all(&health, ServingStatus::NotServing).await;
    tokio::time::sleep(drain_delay).await;
}

/// The process signals stepgate handles, registered up front.
struct Signals {
    terminate: Terminate,
    hangup: reload::Hangup,
}

impl Signals {
    #[cfg(unix)]
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            terminate: Terminate {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            },
            hangup: signal(SignalKind::hangup())?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            terminate: Terminate,
            hangup: (),
        })
    }
}

#[cfg(unix)]
struct Terminate {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Terminate {
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

#[cfg(not(unix))]
struct Terminate;

#[cfg(not(unix))]
impl Terminate {
    async fn wait(self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
