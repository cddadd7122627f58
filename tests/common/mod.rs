//! Shared helpers for the black-box tests: the real `stepgate` binary as a child process, demo
//! tokens minted in-process, temporary policy files and Envoy-shaped `CheckRequest`s.
//!
//! Each test binary compiles this module separately; not every binary uses every helper.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use envoy_types::{
    ext_authz::v3::pb::CheckRequest,
    pb::envoy::{
        config::core::v3::{HeaderMap, HeaderValue},
        service::auth::v3::{
            AttributeContext,
            attribute_context::{HttpRequest as EnvoyHttpRequest, Request as EnvoyRequest},
        },
    },
};
use jsonwebtoken::Algorithm;
use stepgate::demo::{self, TokenSpec};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// How long a server may take to log its listening line, and then to report SERVING.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Paths and policies
// ---------------------------------------------------------------------------------------------

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the stepgate binary with `args` to its end: (exit code, stdout, stderr).
pub fn run_bin<I, S>(args: I) -> (Option<i32>, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("running stepgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_stepgate")
}

pub fn demo_policy_path() -> PathBuf {
    manifest_dir().join("examples/stepgate.yaml")
}

pub fn demo_keys_dir() -> PathBuf {
    manifest_dir().join("examples/demo-keys")
}

pub fn jwks_path() -> PathBuf {
    demo_keys_dir().join("jwks.json")
}

/// The demo policy's text with `jwks_file` pointing at the absolute path of the demo JWKS, so a
/// copy works from any folder.
pub fn demo_policy_text() -> String {
    let text = std::fs::read_to_string(demo_policy_path()).expect("reading examples/stepgate.yaml");
    let replaced = text.replace(
        "jwks_file: demo-keys/jwks.json",
        &format!("jwks_file: {}", jwks_path().display()),
    );
    assert_ne!(
        replaced, text,
        "examples/stepgate.yaml no longer has `jwks_file: demo-keys/jwks.json`; update the tests"
    );
    replaced
}

/// `serve` on `policy` with an admin listener on a port of its choosing (and metrics if asked),
/// ready: the server and the admin listener's URL, read from its log.
pub async fn serve_with_admin(policy: &Path, metrics: bool) -> (Server, String) {
    let server = Server::spawn_with(
        policy,
        Spawn {
            args: vec!["--admin-listen".into(), "127.0.0.1:0".into()],
            metrics,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let line = server
        .wait_for_log(Duration::from_secs(10), |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("admin listener on "))
        })
        .await
        .expect("the admin listener's log line");
    let url = line["message"].as_str().unwrap()["admin listener on ".len()..].to_owned();
    (server, url)
}

/// The role the admin tests' policies grant the admin API to (tokens of demo-oidc).
pub const ADMIN_ROLE: &str = "stepgate.admin";

/// A demo-oidc token of the operator `ops`, carrying [`ADMIN_ROLE`].
pub fn operator_token() -> String {
    mint(&TokenSpec {
        subject: "ops".into(),
        ..oidc(&[ADMIN_ROLE], None, &[])
    })
}

/// `stepgate admin <args>` against `admin_url` as the operator ([`operator_token`]): its stdout
/// as JSON; fails the test when the command does.
pub fn admin_ok(admin_url: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin())
        .arg("admin")
        .args(args)
        .args(["--server", admin_url, "--bearer", &operator_token()])
        .output()
        .expect("running stepgate admin");
    assert!(
        out.status.success(),
        "stepgate admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// [`demo_policy_text`] without its `records:` and `risk:` sections (the last ones), for a test that
/// writes its own.
pub fn demo_policy_without_risk() -> String {
    let text = demo_policy_text();
    let at = text
        .find("\n# Decision records")
        .or_else(|| text.find("\nrecords:"))
        .expect("examples/stepgate.yaml no longer ends with its `records:` and `risk:` sections; update the tests");
    text[..at].to_owned() + "\n"
}

/// `text` with `from` replaced by `to`, failing loudly when `from` is not there (so a changed demo
/// policy cannot silently turn a test into a no-op).
pub fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the policy text no longer contains {from:?}; update the test"
    );
    text.replacen(from, to, 1)
}

/// The wire-transfer rule's requirement line in the demo policy.
pub const WIRE_REQUIRE: &str = "require: { auth_contexts: [c1], max_age: 15m }";

/// A new temporary folder of this process, named after `name` (the caller removes it).
pub fn temp_dir(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "stepgate-test-{}-{}-{nanos}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("creating a temporary folder");
    dir
}

/// A policy file in its own temporary folder, removed on drop.
#[derive(Debug)]
pub struct TempPolicy {
    dir: PathBuf,
    pub path: PathBuf,
}

impl TempPolicy {
    pub fn new(name: &str, text: &str) -> Self {
        let dir = temp_dir(name);
        let path = dir.join("policy.yaml");
        let policy = Self { dir, path };
        policy.write(text);
        policy
    }

    /// Replaces the file's content (write to a sibling, then rename: a reader never sees half).
    pub fn write(&self, text: &str) {
        let tmp = self.dir.join("policy.yaml.tmp");
        std::fs::write(&tmp, text).expect("writing a policy file");
        std::fs::rename(&tmp, &self.path).expect("renaming a policy file");
    }
}

impl Drop for TempPolicy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// Every token minted by this test binary, so log tests can check none of them leaked.
static MINTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// Signs `spec` at the real current time with the demo key for `alg` (RS256 or ES256).
pub fn mint_with(spec: &TokenSpec, alg: Algorithm) -> String {
    let (file, kid) = match alg {
        Algorithm::ES256 => ("demo-ec-private.pem", demo::DEMO_EC_KID),
        Algorithm::RS256 => ("demo-rsa-private.pem", demo::DEMO_RSA_KID),
        other => panic!("no demo key for {other:?}"),
    };
    let pem = std::fs::read(demo_keys_dir().join(file)).expect("reading a demo private key");
    let token = demo::sign(&spec.claims(unix_now()), &pem, alg, kid).expect("signing a demo token");
    MINTED.lock().unwrap().push(token.clone());
    token
}

pub fn mint(spec: &TokenSpec) -> String {
    mint_with(spec, Algorithm::RS256)
}

pub fn minted_tokens() -> Vec<String> {
    MINTED.lock().unwrap().clone()
}

/// An Entra-style user token (demo-entra issuer) with the given `acrs` and `xms_cc`.
pub fn entra(acrs: &[&str], xms_cc: &[&str]) -> TokenSpec {
    TokenSpec {
        acrs: acrs.iter().map(|s| s.to_string()).collect(),
        xms_cc: xms_cc.iter().map(|s| s.to_string()).collect(),
        ..TokenSpec::default()
    }
}

/// A token of the standards-based demo issuer (demo-oidc).
/// `stepgate check --config <policy>`: its exit code, standard output and standard error.
pub fn check_policy(policy: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(policy)
        .output()
        .expect("running stepgate check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn oidc(roles: &[&str], acr: Option<&str>, amr: &[&str]) -> TokenSpec {
    TokenSpec {
        issuer: demo::DEMO_OIDC_ISSUER.to_owned(),
        roles: roles.iter().map(|s| s.to_string()).collect(),
        acr: acr.map(str::to_owned),
        amr: amr.iter().map(|s| s.to_string()).collect(),
        ..TokenSpec::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

/// A running `stepgate serve`. Its stderr is drained into `logs` by a background thread; the process
/// is killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub port: u16,
    logs: Arc<Mutex<Vec<String>>>,
    /// `--metrics-listen`'s port, when the spawn asked for metrics.
    pub metrics_port: Option<u16>,
}

/// How [`Server::spawn_with`] runs the process, beyond the defaults of [`Server::spawn`].
#[derive(Debug, Clone, Default)]
pub struct Spawn {
    /// Extra `serve` arguments.
    pub args: Vec<String>,
    /// Serve metrics on an ephemeral port (`Server::metrics_port`).
    pub metrics: bool,
    /// After the listening line, stop reading stderr (the pipe stays open and fills up).
    pub stop_reading_stderr: bool,
    /// The process's limit of open files (`RLIMIT_NOFILE`).
    pub max_open_files: Option<u64>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Log in the text format instead of JSON (`json_logs` then finds nothing).
    pub text_log: bool,
    /// Give the process a stdout pipe that nothing reads (it fills up, and writes to it block).
    pub stdout_unread: bool,
}

impl Server {
    /// Starts `stepgate serve --config <policy> --listen 127.0.0.1:0 --log-format json`, waits for
    /// the listening log line and then for gRPC health SERVING.
    pub async fn start(policy: &Path) -> Self {
        let server = Self::spawn(policy);
        server.wait_ready().await;
        server
    }

    /// [`Server::start`] with the metrics listener on ([`Server::scrape`]).
    pub async fn start_with_metrics(policy: &Path) -> Self {
        let server = Self::spawn_with(
            policy,
            Spawn {
                metrics: true,
                ..Spawn::default()
            },
        );
        server.wait_ready().await;
        server
    }

    /// Starts the process and waits for its listening line only (no health check).
    pub fn spawn(policy: &Path) -> Self {
        Self::spawn_with(policy, Spawn::default())
    }

    /// Starts `serve` as [`Server::spawn`] does, with `spawn`'s arguments and conditions;
    /// waits for its listening line only.
    pub fn spawn_with(policy: &Path, spawn: Spawn) -> Self {
        let mut command = Command::new(bin());
        command
            .arg("serve")
            .arg("--config")
            .arg(policy)
            .args(["--listen", "127.0.0.1:0", "--log-format"])
            .arg(if spawn.text_log { "text" } else { "json" })
            .args(&spawn.args)
            .envs(spawn.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_LOG")
            .env_remove("STEPGATE_LOG_LEVEL")
            .env_remove("STEPGATE_DRAIN_DELAY")
            .stdin(Stdio::null())
            .stdout(if spawn.stdout_unread {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        if spawn.metrics {
            command.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        if let Some(limit) = spawn.max_open_files {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: `setrlimit` is async-signal-safe, and the closure touches nothing else.
            unsafe {
                command.pre_exec(move || {
                    let rlimit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().expect("starting the stepgate binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let metrics_port = Arc::new(Mutex::new(None));
        let (port_tx, port_rx) = mpsc::channel::<u16>();
        {
            let logs = Arc::clone(&logs);
            let metrics_port = Arc::clone(&metrics_port);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut port_tx = Some(port_tx);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match reader.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    if let Some(port) = port_in(&line, "metrics listening on") {
                        *metrics_port.lock().unwrap() = Some(port);
                    }
                    let listening = port_tx.is_some() && listening_port(&line).is_some();
                    logs.lock().unwrap().push(line.clone());
                    if listening {
                        let _ = port_tx.take().unwrap().send(listening_port(&line).unwrap());
                        if spawn.stop_reading_stderr {
                            // Hold the pipe open, unread, for the rest of the test binary.
                            loop {
                                std::thread::park();
                            }
                        }
                    }
                }
            });
        }
        match port_rx.recv_timeout(STARTUP_DEADLINE) {
            Ok(port) => {
                let metrics_port = *metrics_port.lock().unwrap();
                Self {
                    child,
                    port,
                    logs,
                    metrics_port,
                }
            }
            Err(why) => {
                let _ = child.kill();
                let status = child.wait().ok();
                // Let the reader thread collect what is left.
                std::thread::sleep(Duration::from_millis(100));
                let captured = logs.lock().unwrap().join("\n");
                panic!(
                    "stepgate serve --config {} did not log `stepgate listening on` ({}; exit \
                     status {status:?}). Captured stderr:\n{captured}",
                    policy.display(),
                    match why {
                        mpsc::RecvTimeoutError::Timeout =>
                            format!("nothing within {STARTUP_DEADLINE:?}"),
                        mpsc::RecvTimeoutError::Disconnected => "stderr closed".to_owned(),
                    }
                );
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A fresh gRPC channel (one per test: a channel belongs to the runtime that made it).
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("a valid URL")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}\n{}", self.url(), self.logs_text()))
    }

    /// A fresh gRPC channel whose connection comes from `local`, a loopback address other than
    /// 127.0.0.1 (Linux gives all of 127.0.0.0/8 to the loopback interface): a second caller
    /// the server tells apart by its address.
    pub async fn channel_from(&self, local: std::net::Ipv4Addr) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("a valid URL")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(BoundConnector {
                local,
                port: self.port,
            })
            .await
            .unwrap_or_else(|e| panic!("connecting from {local}: {e}\n{}", self.logs_text()))
    }

    /// The text of `/metrics` (the server was spawned with metrics).
    pub async fn scrape(&self) -> String {
        let port = self.metrics_port.expect("spawned with metrics");
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client")
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text")
    }

    /// Waits until gRPC health reports SERVING for the whole server and for the decision service
    /// (set by the readiness task once keys are loaded). Polls; fails after the startup deadline.
    pub async fn wait_ready(&self) {
        self.wait_ready_at(Endpoint::from_shared(self.url()).expect("a valid URL"))
            .await;
    }

    /// As [`Server::wait_ready`], asking through `endpoint` (one with TLS settings, for a server
    /// started with `--tls-cert`).
    pub async fn wait_ready_at(&self, endpoint: Endpoint) {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let mut last;
        loop {
            match self.health(&endpoint).await {
                Ok(true) => return,
                Ok(false) => last = "NOT_SERVING".to_owned(),
                Err(e) => last = e,
            }
            if Instant::now() > deadline {
                panic!(
                    "stepgate on port {} did not report SERVING within {STARTUP_DEADLINE:?} \
                     (last: {last}). Captured stderr:\n{}",
                    self.port,
                    self.logs_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Whether health reports SERVING now (for the server and `Decide`).
    pub async fn serving(&self) -> Result<bool, String> {
        self.health(&Endpoint::from_shared(self.url()).expect("a valid URL"))
            .await
    }

    async fn health(&self, endpoint: &Endpoint) -> Result<bool, String> {
        let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = HealthClient::new(channel);
        for service in ["", "stepgate.v1.DecisionService"] {
            let status = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await
                .map_err(|s| format!("health {service:?}: {s}"))?
                .into_inner()
                .status;
            if status != ServingStatus::Serving as i32 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// All stderr lines captured so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn logs_text(&self) -> String {
        self.logs().join("\n")
    }

    /// The captured lines that parse as JSON objects.
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    /// Polls the captured log text until it contains every one of `needles` (log lines reach
    /// stderr through a buffer, up to 20 ms after the event); false after `timeout`.
    pub async fn wait_for_text(&self, timeout: Duration, needles: &[&str]) -> bool {
        self.poll_logs(timeout, |server| {
            let logs = server.logs_text();
            needles
                .iter()
                .all(|needle| logs.contains(needle))
                .then_some(())
        })
        .await
        .is_some()
    }

    /// Polls the captured JSON log lines until one satisfies `pred`; `None` after `timeout`.
    pub async fn wait_for_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        self.poll_logs(timeout, |server| {
            server.json_logs().into_iter().find(|v| pred(v))
        })
        .await
    }

    /// Checks the captured logs every 20 ms until `found` returns something; `None` after
    /// `timeout`.
    async fn poll_logs<T>(
        &self,
        timeout: Duration,
        found: impl Fn(&Self) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(hit) = found(self) {
                return Some(hit);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal with the `kill` command (`TERM`, `HUP`, …).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid()
        );
    }

    /// Polls `try_wait` until the process exits; `None` if it is still running at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on the server") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of a JSON log line whose message contains `stepgate listening on`.
fn listening_port(line: &str) -> Option<u16> {
    port_in(line, "stepgate listening on")
}

/// The port of the address that follows `after` in a log line's message (JSON or text).
fn port_in(line: &str, after: &str) -> Option<u16> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else {
        return text_port_after(line, after);
    };
    let message = value.get("message")?.as_str()?;
    let (_, rest) = message.split_once(after)?;
    let digits: String = rest
        .trim()
        .rsplit_once(':')?
        .1
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// One demo-policy server shared by the tests of a binary that run at the same time. Each test
/// holds an `Arc`; when the last holder drops it the process is killed (statics are never dropped,
/// so a plain `OnceLock<Server>` would leak the process), and the next caller starts a new one.
pub async fn shared_server() -> Arc<Server> {
    static SHARED: Mutex<Weak<Server>> = Mutex::new(Weak::new());
    let server = {
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        match slot.upgrade() {
            Some(server) => server,
            None => {
                let server = Arc::new(Server::spawn(&demo_policy_path()));
                *slot = Arc::downgrade(&server);
                server
            }
        }
    };
    server.wait_ready().await;
    server
}

// ---------------------------------------------------------------------------------------------
// Envoy-shaped requests
// ---------------------------------------------------------------------------------------------

/// A `CheckRequest` as Envoy sends it with `encode_raw_headers: false`: lower-case header keys,
/// pseudo-headers included, `method`/`host`/`path` set.
pub fn envoy_check(
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> CheckRequest {
    let mut map: HashMap<String, String> = HashMap::new();
    map.insert(":authority".into(), authority.into());
    map.insert(":method".into(), method.into());
    map.insert(":path".into(), path.into());
    map.insert(":scheme".into(), "http".into());
    map.insert(
        "x-request-id".into(),
        "3c1c5b1e-0000-4000-8000-000000000000".into(),
    );
    for (k, v) in headers {
        map.insert(k.to_ascii_lowercase(), v.to_string());
    }
    let is_grpc = map
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/grpc"));
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(EnvoyRequest {
                time: None,
                http: Some(EnvoyHttpRequest {
                    id: "1234567890".into(),
                    method: method.into(),
                    headers: map,
                    path: path.into(),
                    host: authority.into(),
                    scheme: "http".into(),
                    protocol: if is_grpc { "HTTP/2" } else { "HTTP/1.1" }.into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

/// A `Check` of `GET <path>` on `app.example` from `source`, with `token` if any: (HTTP status,
/// the `stepgate.block` and `stepgate.reason` metadata, the denial body).
pub async fn check_from(
    server: &Server,
    path: &str,
    source: &str,
    token: Option<&str>,
) -> (i32, Option<String>, String, String) {
    check_on(server.channel().await, path, source, token).await
}

/// [`check_from`] on an open channel.
pub async fn check_on(
    channel: Channel,
    path: &str,
    source: &str,
    token: Option<&str>,
) -> (i32, Option<String>, String, String) {
    use envoy_types::pb::envoy::{
        config::core::v3::{Address, SocketAddress, address, socket_address::PortSpecifier},
        service::auth::v3::{
            attribute_context::Peer, authorization_client::AuthorizationClient,
            check_response::HttpResponse,
        },
    };
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| ("authorization", b))
        .into_iter()
        .collect();
    let mut request = envoy_check("GET", "app.example", path, &headers);
    request.attributes.as_mut().unwrap().source = Some(Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: source.to_owned(),
                port_specifier: Some(PortSpecifier::PortValue(40000)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    let response = AuthorizationClient::new(channel)
        .check(request)
        .await
        .expect("Check answers")
        .into_inner();
    let metadata = response.dynamic_metadata.unwrap_or_default().fields;
    let text = |name: &str| {
        metadata.get(name).and_then(|v| match &v.kind {
            Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
    };
    let (status, body) = match response.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            (denied.status.map_or(0, |s| s.code), denied.body)
        }
        Some(HttpResponse::OkResponse(_)) => (200, String::new()),
        other => panic!("unexpected answer {other:?}"),
    };
    (
        status,
        text("stepgate.block"),
        text("stepgate.reason").unwrap_or_default(),
        body,
    )
}

/// The same request as Envoy sends it with `encode_raw_headers: true`: every header an entry of
/// `header_map` with `raw_value` bytes (and `value` empty), the `headers` map empty.
pub fn to_header_map_shape(request: &CheckRequest) -> CheckRequest {
    let mut out = request.clone();
    let http = out
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("an http request");
    let mut entries: Vec<HeaderValue> = http
        .headers
        .drain()
        .map(|(key, value)| HeaderValue {
            key,
            value: String::new(),
            raw_value: value.into_bytes(),
        })
        .collect();
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    // Keep entries already in header_map (a request already in this shape).
    http.header_map
        .get_or_insert_with(|| HeaderMap {
            headers: Vec::new(),
        })
        .headers
        .extend(entries);
    out
}

/// Adds one raw `header_map` entry (switching the request to the `header_map` shape first).
pub fn with_raw_header(request: &CheckRequest, key: &str, raw: &[u8]) -> CheckRequest {
    let mut out = to_header_map_shape(request);
    out.attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .and_then(|h| h.header_map.as_mut())
        .expect("a header map")
        .headers
        .push(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: raw.to_vec(),
        });
    out
}

/// Opens TCP connections to the server's port on 127.0.0.1 from the address `local`.
#[derive(Clone)]
struct BoundConnector {
    local: std::net::Ipv4Addr,
    port: u16,
}

impl tonic::codegen::Service<tonic::codegen::http::Uri> for BoundConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let (local, port) = (self.local, self.port);
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((local, 0).into())?;
            let stream = socket
                .connect((std::net::Ipv4Addr::LOCALHOST, port).into())
                .await?;
            stream.set_nodelay(true)?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// A server logging in the text format
// ---------------------------------------------------------------------------------------------

impl Server {
    /// [`Server::spawn_with`] with `args`, logging in the text format: its lines are kept as
    /// written (`logs`, `logs_text`, `wait_for_text`; `json_logs` finds none), for tests of what
    /// the text format writes, the default an operator gets.
    pub fn spawn_text(policy: &Path, args: &[&str]) -> Self {
        Self::spawn_with(
            policy,
            Spawn {
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                text_log: true,
                ..Spawn::default()
            },
        )
    }
}

/// [`serve_with_admin`] logging in the text format ([`Server::spawn_text`]).
pub async fn serve_text_with_admin(policy: &Path) -> (Server, String) {
    let server = Server::spawn_text(policy, &["--admin-listen", "127.0.0.1:0"]);
    server.wait_ready().await;
    const ADMIN: &str = "admin listener on ";
    assert!(
        server
            .wait_for_text(Duration::from_secs(10), &[ADMIN])
            .await,
        "no admin listener line:\n{}",
        server.logs_text()
    );
    let url = server
        .logs()
        .iter()
        .find_map(|l| {
            let (_, rest) = l.split_once(ADMIN)?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .expect("the admin listener's URL");
    (server, url)
}

/// The port of the `host:port` that follows `after` in a text log line.
fn text_port_after(line: &str, after: &str) -> Option<u16> {
    let (_, rest) = line.split_once(after)?;
    rest.split_whitespace()
        .next()?
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
}
