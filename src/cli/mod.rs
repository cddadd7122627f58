//! Command-line interface. Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or
//! arguments.

mod admin;
mod check;
mod connect;
mod decide;
mod health;
mod replay;
mod test;
mod token;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, builder::TypedValueParser as _};
use stepgate::{
    config::{self, ConfigError, duration},
    identity::{keys, san},
    policy::{self, Policy},
    server::{self, ReadyWhen, ServeOptions, TlsSettings, TransportLimits},
    telemetry::{self, LogFormat},
};

#[derive(Debug, Parser)]
#[command(
    name = "stepgate",
    version,
    about = "Step-up authentication decisions for Envoy ext_authz and any gRPC caller"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve ext_authz Check, Decide, gRPC health and reflection on one port.
    Serve(ServeArgs),
    /// Validate a policy file and print its compiled rules.
    Check(check::CheckArgs),
    /// Mint a demo token signed with a demo key (for trying stepgate out; never for production).
    Token(token::TokenArgs),
    /// Ask a running server for a decision, or evaluate one offline with --config. Prints JSON.
    Decide(decide::DecideArgs),
    /// Ask a running server's gRPC health (exit 0 when SERVING): for exec probes over TLS.
    Health(health::HealthArgs),
    /// Block, unblock or list through a server's admin API (its --admin-listen).
    Admin(admin::AdminArgs),
    /// Run policy test suites (YAML cases: request, caller, time, expected decision) offline.
    Test(test::TestArgs),
    /// Re-decide recorded decisions under a candidate policy and report what would change.
    Replay(replay::ReplayArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Policy file (YAML).
    #[arg(long, short, env = "STEPGATE_CONFIG")]
    config: PathBuf,
    /// Address of the gRPC listener.
    #[arg(long, env = "STEPGATE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[arg(long, env = "STEPGATE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level or filter (RUST_LOG takes precedence). Decision lines: STEP_UP and DENY at
    /// info, ALLOW at debug (`info,stepgate::decision=debug` logs every decision).
    #[arg(long, env = "STEPGATE_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Also log this share of ALLOW decisions at info (0 to 1, e.g. 0.01: one in a hundred, each
    /// line with `sampled: 100`). Every decision is counted in the metrics whatever the share.
    #[arg(long, env = "STEPGATE_LOG_ALLOW_SAMPLE", default_value_t = 0.0, value_parser = parse_share)]
    log_allow_sample: f64,
    /// On SIGTERM, how long to report NOT_SERVING before closing the listener (e.g. 5s).
    #[arg(long, env = "STEPGATE_DRAIN_DELAY", default_value = "0s", value_parser = parse_duration)]
    drain_delay: Duration,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 0.0.0.0:9464. Off by default.
    #[arg(long, env = "STEPGATE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// When gRPC health reports SERVING: all-issuers have keys, any-issuer has keys, or always.
    #[arg(
        long,
        env = "STEPGATE_READY_WHEN",
        value_enum,
        default_value = "all-issuers"
    )]
    ready_when: ReadyWhen,
    /// Serving threads (default: the CPUs available to the process, cgroup quota and affinity
    /// included).
    #[arg(long, env = "STEPGATE_WORKERS")]
    workers: Option<usize>,
    /// How the workers share the load: `connections` gives each connection to one worker, which
    /// serves all its calls; `calls` lets every worker take any call (one busy connection can
    /// then use every core, at the price of handing calls between threads).
    #[arg(
        long,
        env = "STEPGATE_BALANCE",
        value_enum,
        default_value = "connections"
    )]
    balance: Balance,
    /// Largest Check message read, in bytes (a larger Check is answered 413).
    #[arg(long, env = "STEPGATE_MAX_MESSAGE_BYTES", default_value_t = TransportLimits::default().max_message_bytes,
          value_parser = clap::value_parser!(u32).range(1024..).map(|n| n as usize))]
    max_message_bytes: usize,
    /// Largest Decide message read, in bytes (a larger Decide is a 413 request_too_large denial).
    #[arg(long, env = "STEPGATE_MAX_DECIDE_MESSAGE_BYTES", default_value_t = TransportLimits::default().max_decide_message_bytes,
          value_parser = clap::value_parser!(u32).range(1024..).map(|n| n as usize))]
    max_decide_message_bytes: usize,
    /// Bytes of unfinished request messages held at most, over every call (a Check past it is
    /// answered 503).
    #[arg(long, env = "STEPGATE_MAX_BUFFERED_BYTES", default_value_t = TransportLimits::default().max_buffered_bytes,
          value_parser = clap::value_parser!(u64).range(1024..=(1 << 40)).map(|n| n as usize))]
    max_buffered_bytes: usize,
    // The three connection bounds may be given twice, the last value winning, so that the Helm
    // chart's `extraArgs` can override the chart's own; every other flag given twice is an error.
    /// Concurrent calls (HTTP/2 streams) per connection (given twice: the last).
    #[arg(long, env = "STEPGATE_MAX_CONCURRENT_STREAMS", default_value_t = TransportLimits::default().max_concurrent_streams,
          value_parser = clap::value_parser!(u32).range(1..), overrides_with = "max_concurrent_streams")]
    max_concurrent_streams: u32,
    /// Open gRPC connections; more clients wait in the listen backlog (given twice: the last).
    #[arg(long, env = "STEPGATE_MAX_CONNECTIONS", default_value_t = TransportLimits::default().max_connections,
          value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize),
          overrides_with = "max_connections")]
    max_connections: usize,
    /// Open gRPC connections from one source address; more are closed on accept (0: no bound
    /// but --max-connections; given twice: the last).
    #[arg(long, env = "STEPGATE_MAX_CONNECTIONS_PER_SOURCE", default_value_t = TransportLimits::default().max_connections_per_source,
          value_parser = clap::value_parser!(u32).map(|n| n as usize),
          overrides_with = "max_connections_per_source")]
    max_connections_per_source: usize,
    /// A connection with no call for this long is closed (HTTP/2 GOAWAY; e.g. 5m, 30s).
    #[arg(long, env = "STEPGATE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    idle_timeout: Duration,
    /// A connection open this long (give or take a tenth) is told to go away however busy, so
    /// that proxies spread over replicas added since and client certificates are checked again
    /// (0: never; e.g. 30m).
    #[arg(long, env = "STEPGATE_MAX_CONNECTION_AGE", default_value = "30m", value_parser = parse_duration)]
    max_connection_age: Duration,
    /// Longest a call may take, reading its request included (e.g. 5s, 750ms).
    #[arg(long, env = "STEPGATE_REQUEST_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    request_timeout: Duration,
    /// Reload the policy when its file changes (a ConfigMap update, a save), besides on SIGHUP.
    #[arg(long, env = "STEPGATE_WATCH_CONFIG", default_value_t = true, action = clap::ArgAction::Set)]
    watch_config: bool,
    /// Serve a policy that trusts the bundled demo keys (whose private keys are published) on a
    /// listener beyond 127.0.0.1: only for trying the demo from another machine or a container.
    #[arg(long, env = "STEPGATE_ALLOW_DEMO_KEYS")]
    allow_demo_keys: bool,
    /// Time a new connection has to send its first bytes, or finish its TLS handshake, before it
    /// is closed (e.g. 10s).
    #[arg(long, env = "STEPGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    handshake_timeout: Duration,
    /// Serve TLS on the gRPC listeners with this certificate chain (PEM); reloaded when it changes.
    #[arg(long, env = "STEPGATE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "STEPGATE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: require a client certificate issued by one of these CAs (PEM bundle).
    #[arg(long, env = "STEPGATE_CLIENT_CA", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// With --client-ca: accept only client certificates naming one of these subject alternative
    /// names, each matching a name of its own type: an IP address, a URI (has a colon, such as a
    /// SPIFFE ID) or a DNS name (any ASCII case); exact otherwise. Repeatable.
    #[arg(
        long,
        env = "STEPGATE_CLIENT_SAN",
        value_delimiter = ',',
        requires = "client_ca",
        value_parser = san::SanName::from_entry
    )]
    client_san: Vec<san::SanName>,
    /// Only peers in these networks may call ext_authz `Check`, whose `source.address` source
    /// blocks and risk signals believe (CIDR or one address; comma-separated or repeated): the
    /// proxies' networks. Other callers' Checks are answered 403 `caller_not_allowed`. Default:
    /// any peer that reaches the port.
    #[arg(
        long,
        env = "STEPGATE_CHECK_FROM",
        value_delimiter = ',',
        value_parser = server::check_callers::parse_network
    )]
    check_from: Vec<ipnet::IpNet>,
    /// With --client-ca: only clients whose certificate names one of these subject alternative
    /// names may call `Check` (the proxies); others may still call `Decide`. Repeatable.
    #[arg(
        long,
        env = "STEPGATE_CHECK_CLIENT_SAN",
        value_delimiter = ',',
        requires = "client_ca",
        value_parser = san::SanName::from_entry
    )]
    check_client_san: Vec<san::SanName>,
    /// A second gRPC listener (same services and transport), for operators: the policy's
    /// `explain.admin_listener` allows `explain` on it. Keep it on loopback or a private network.
    #[arg(long, env = "STEPGATE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// The shared risk store, over the policy's `risk.store`: `memory` or a Redis URL
    /// (`redis://[:password@]host:6379/0`, `rediss://` for TLS). Read at start; keeps a password
    /// out of the policy file (set it from a Secret).
    #[arg(long, env = "STEPGATE_RISK_STORE", hide_env_values = true)]
    risk_store: Option<String>,
    /// Write a decision record (one JSON line per decision, docs/records.md) to this file, or
    /// `-` for stdout, whatever the policy's `records.enabled`; its other settings apply.
    #[arg(long, env = "STEPGATE_RECORDS")]
    records: Option<PathBuf>,
    /// CAs (PEM bundle) to trust, besides the bundled web roots, for every identity provider
    /// without its own `ca_file`: an internal IdP behind a private or corporate CA.
    #[arg(long, env = "STEPGATE_IDP_CA")]
    idp_ca: Option<PathBuf>,
    /// Export OpenTelemetry traces to this OTLP/gRPC endpoint (e.g. http://otel-collector:4317).
    /// Traces are also on when OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
    /// OTEL_TRACES_SAMPLER is set; off otherwise.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Serve gRPC server reflection (lets grpcurl list and describe the services).
    #[arg(long, env = "STEPGATE_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    reflection: bool,
}

/// `name=JSON` (a value that is not JSON is taken as a string), for `--claim` and `--attr`.
pub(crate) fn parse_name_json(text: &str) -> Result<(String, serde_json::Value), String> {
    let (name, value) = text.split_once('=').ok_or("expected name=JSON")?;
    let value =
        serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
    Ok((name.to_owned(), value))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    duration::parse(text).map(|s| s.as_duration())
}

/// A duration above zero, milliseconds allowed (`500ms`, `5s`).
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match duration::parse_span(text)? {
        Duration::ZERO => Err("must be longer than 0s".to_owned()),
        d => Ok(d),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Check(args) => check::run(args),
        Command::Token(args) => token::run(args),
        Command::Decide(args) => decide::run(args),
        Command::Health(args) => health::run(args),
        Command::Admin(args) => admin::run(args),
        Command::Test(args) => test::run(args),
        Command::Replay(args) => replay::run(args),
    }
}

/// Loads and compiles a policy file, or explains on stderr why not.
pub(crate) fn load_policy(path: &std::path::Path) -> Result<Policy, ConfigError> {
    let file = config::load(path)?;
    let base = path.parent().unwrap_or(std::path::Path::new("."));
    policy::compile(&file, base)
}

/// Writes command output to stdout. A closed pipe (`stepgate decide … | head`) is not an error
/// worth a panic: the reader has what it wanted.
pub(crate) fn print_stdout(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// How `serve`'s workers share the load (docs/operations.md, "Workers").
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Balance {
    /// Each worker a thread with its own runtime, serving the connections given to it: nothing
    /// moves between threads per call.
    Connections,
    /// One work-stealing runtime: a connection's calls run on whichever worker is free.
    Calls,
}

/// A share from 0 to 1.
fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!(
            "expected a share from 0 to 1 (e.g. 0.01), got {text:?}"
        )),
    }
}

pub(crate) fn config_error(path: &std::path::Path, err: &ConfigError) -> ExitCode {
    eprintln!("stepgate: invalid policy {}: {err}", path.display());
    ExitCode::from(2)
}

fn serve(args: ServeArgs) -> ExitCode {
    let logs = telemetry::init(args.log_format, &args.log_level);
    telemetry::sample_allows(args.log_allow_sample);
    if args.max_buffered_bytes < args.max_message_bytes {
        logs.flush();
        eprintln!(
            "stepgate: --max-buffered-bytes ({}) is below --max-message-bytes ({}): a message of \
             the largest size arriving in pieces could never be read",
            args.max_buffered_bytes, args.max_message_bytes
        );
        return ExitCode::from(2);
    }
    if let Some(path) = &args.idp_ca {
        let roots = config::read_file_at_most(path, 1024 * 1024)
            .map_err(|e| e.to_string())
            .and_then(|pem| keys::parse_ca_bundle(&pem));
        match roots {
            Ok(roots) => {
                keys::trust_extra_roots(roots);
            }
            Err(err) => {
                logs.flush();
                eprintln!("stepgate: --idp-ca {}: {err}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let policy = match load_policy(&args.config) {
        Ok(policy) => policy,
        Err(err) => {
            tracing::error!(config = %args.config.display(), field = %err.path, "invalid policy: {err}");
            logs.flush();
            return config_error(&args.config, &err);
        }
    };
    // The CPUs this process may use (cgroup quota and affinity included), unless overridden.
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    // With `connections`, this thread's runtime is worker 0 and runs the background tasks, and
    // `server::run` starts the others, each on a thread and runtime of its own
    // (server/workers.rs). With `calls`, one work-stealing runtime serves every connection.
    let (runtime, serving_threads) = match args.balance {
        Balance::Connections => (
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            workers.max(1),
        ),
        Balance::Calls => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.enable_all().worker_threads(workers.max(1));
            // A finished Check then queues its connection's write behind the other ready Checks
            // instead of running it next, so their answers leave in one write (see
            // .cargo/config.toml).
            #[cfg(tokio_unstable)]
            runtime.disable_lifo_slot();
            (runtime.build(), 1)
        }
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(err) => {
            logs.flush();
            eprintln!("stepgate: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(workers, balance = ?args.balance, "starting the runtime");
    if let Err(err) =
        server::check_callers::check_client_sans(&args.check_client_san, &args.client_san)
    {
        tracing::error!("{err}");
        logs.flush();
        eprintln!("stepgate: {err}");
        return ExitCode::from(2);
    }
    let tls = args
        .tls_cert
        .zip(args.tls_key)
        .map(|(cert, key)| TlsSettings {
            cert,
            key,
            client_ca: args.client_ca,
            client_sans: args.client_san,
        });
    // Refused like a bad policy (exit 2), before anything listens; the server loads them again.
    if let Some(settings) = &tls
        && let Err(err) = server::tls::Tls::load(settings.clone())
    {
        tracing::error!("TLS: {err}");
        logs.flush();
        eprintln!("stepgate: TLS: {err}");
        return ExitCode::from(2);
    }
    // Checked here rather than by clap, whose message would repeat the URL (and its password).
    let risk_store = match args
        .risk_store
        .as_deref()
        .map(stepgate::risk::signals::StoreSpec::parse)
        .transpose()
    {
        Ok(store) => store,
        Err(err) => {
            tracing::error!("--risk-store: {err}");
            logs.flush();
            eprintln!("stepgate: --risk-store: {err}");
            return ExitCode::from(2);
        }
    };
    let options = ServeOptions {
        config: args.config,
        listen: args.listen,
        drain_delay: args.drain_delay,
        metrics_listen: args.metrics_listen,
        ready_when: args.ready_when,
        watch_config: args.watch_config,
        allow_demo_keys: args.allow_demo_keys,
        tls,
        admin_listen: args.admin_listen,
        reflection: args.reflection,
        otlp_endpoint: args.otlp_endpoint,
        risk_store,
        records: args.records,
        workers: serving_threads,
        check_callers: server::check_callers::CheckCallers::new(
            args.check_from,
            args.check_client_san,
        ),
        limits: TransportLimits {
            max_message_bytes: args.max_message_bytes,
            max_decide_message_bytes: args.max_decide_message_bytes,
            max_concurrent_streams: args.max_concurrent_streams,
            max_connections: args.max_connections,
            max_connections_per_source: args.max_connections_per_source,
            request_timeout: args.request_timeout,
            handshake_timeout: args.handshake_timeout,
            max_buffered_bytes: args.max_buffered_bytes,
            idle_timeout: args.idle_timeout,
            max_connection_age: args.max_connection_age,
        },
    };
    let served = runtime.block_on(server::run(options, policy));
    // A blocking thread still reading a file (a stalled file system) must not keep the process
    // from ending: what the serving left behind gets a moment, not forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            logs.flush();
            eprintln!("stepgate: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Command};

    fn serve(extra: &[&str]) -> Result<Cli, clap::Error> {
        let args = ["stepgate", "serve", "--config", "policy.yaml"];
        Cli::try_parse_from(args.iter().chain(extra))
    }

    #[test]
    fn the_connection_bounds_given_twice_take_the_last_value() {
        let Command::Serve(args) = serve(&[
            "--max-connections",
            "2000",
            "--max-connections-per-source",
            "100",
            "--max-concurrent-streams",
            "100",
            "--max-connections",
            "20000",
            "--max-connections-per-source",
            "0",
            "--max-concurrent-streams",
            "250",
        ])
        .expect("parses")
        .command
        else {
            panic!("not serve");
        };
        assert_eq!(
            (
                args.max_connections,
                args.max_connections_per_source,
                args.max_concurrent_streams
            ),
            (20_000, 0, 250)
        );
    }

    #[test]
    fn any_other_flag_given_twice_is_refused() {
        for flag in ["--tls-cert", "--client-ca", "--listen", "--request-timeout"] {
            let value = if flag == "--listen" {
                "127.0.0.1:1"
            } else {
                "5s"
            };
            let error = serve(&[flag, value, flag, value])
                .err()
                .unwrap_or_else(|| panic!("{flag} given twice was taken"));
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag}: {error}"
            );
        }
    }
}
