//! A controllable identity provider on loopback for the key-lifecycle tests: an OIDC discovery
//! document and a JWKS endpoint whose content, `Cache-Control` and failure mode the test sets while
//! stepgate runs against it.
//!
//! - `GET /.well-known/openid-configuration`: `{"issuer": <settable>, "jwks_uri": "http://127.0.0.1:<port>/keys"}`
//! - `GET /keys`: the current key set (the demo RSA key at start)
//!
//! Each of the two paths has a [`Mode`]: answer normally, HTTP 503, an empty key set, malformed
//! JSON, answer normally after a delay, or redirect to `/keys-moved` on some address. Every
//! request is counted per path and per the mode it met on arrival, so a test can wait for "two
//! more failed refreshes" instead of sleeping.
//!
//! Keys are the demo keys of `examples/demo-keys/` (their private halves sign the test tokens):
//! [`rsa_jwk`] (`stepgate-demo-rsa-1`) and [`ec_jwk`] (`stepgate-demo-ec-1`), taken one by one
//! from `examples/demo-keys/jwks.json`.
//!
//! [`Idp::start_tls`] serves the same over https, with a certificate the test makes (a private CA).
//!
//! Declared from a test file with `#[path = "common/idp.rs"] mod idp;` (next to `mod common;`).
#![allow(dead_code)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Request, Response, body::Bytes, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";
pub const KEYS_PATH: &str = "/keys";
/// Where [`Mode::RedirectTo`] sends a key-set request: the key set, always.
pub const MOVED_KEYS_PATH: &str = "/keys-moved";

/// How a path answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The document (discovery, or the current key set).
    Normal,
    /// HTTP 503 with a plain-text body.
    Unavailable,
    /// `{"keys":[]}` (on the discovery path: `{}`), HTTP 200.
    Empty,
    /// A truncated JSON document, HTTP 200.
    Malformed,
    /// The normal answer, after this delay.
    Slow(Duration),
    /// `302 Found` to `/keys-moved` (which always serves the key set) on this address.
    RedirectTo(SocketAddr),
}

impl Mode {
    /// The name requests are counted under.
    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Unavailable => "unavailable",
            Self::Empty => "empty",
            Self::Malformed => "malformed",
            Self::Slow(_) => "slow",
            Self::RedirectTo(_) => "redirect",
        }
    }
}

#[derive(Debug)]
struct State {
    issuer: String,
    jwks: String,
    cache_control: Option<String>,
    discovery_mode: Mode,
    keys_mode: Mode,
    /// Requests by path, and by (path, mode label on arrival).
    by_path: HashMap<String, usize>,
    by_mode: HashMap<(String, &'static str), usize>,
}

/// The running identity provider. Stops accepting on drop.
#[derive(Debug)]
pub struct Idp {
    pub addr: SocketAddr,
    /// `http`, or `https` when started with [`Idp::start_tls`].
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Idp {
    /// Starts on `127.0.0.1:<ephemeral>` publishing the demo RSA key, both paths normal, issuer
    /// `http://127.0.0.1:<port>`, no `Cache-Control`.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// As [`Idp::start`], over https with `tls`'s certificate: issuer `https://127.0.0.1:<port>`.
    pub async fn start_tls(tls: tokio_rustls::TlsAcceptor) -> Self {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the identity provider");
        let addr = listener.local_addr().expect("the IdP address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let state = Arc::new(Mutex::new(State {
            issuer: format!("{scheme}://{addr}"),
            jwks: jwks(&[rsa_jwk()]).to_string(),
            cache_control: None,
            discovery_mode: Mode::Normal,
            keys_mode: Mode::Normal,
            by_path: HashMap::new(),
            by_mode: HashMap::new(),
        }));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&shared);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |req| answer(req, Arc::clone(&state), scheme, addr));
                    let http = http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(stream), service).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            // A client that refused the certificate: counted by nobody, as
                            // with a real IdP.
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Self {
            addr,
            scheme,
            state,
            task,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    /// Where the issuer's discovery document is (OpenID Connect Discovery 4.3): under the
    /// issuer's own path when it is on this provider, else at the root.
    pub fn discovery_url(&self) -> String {
        let issuer = self.issuer();
        match issuer.starts_with(&self.url("/")) {
            true => format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/')),
            false => self.url(DISCOVERY_PATH),
        }
    }

    pub fn jwks_uri(&self) -> String {
        self.url(KEYS_PATH)
    }

    /// The `issuer` the discovery document names.
    pub fn issuer(&self) -> String {
        self.state().issuer.clone()
    }

    pub fn set_issuer(&self, issuer: &str) {
        self.state().issuer = issuer.to_owned();
    }

    /// Publishes exactly these keys from now on.
    pub fn publish(&self, keys: &[Value]) {
        self.state().jwks = jwks(keys).to_string();
    }

    /// `Cache-Control` on every answer (success or not) from now on; `None` sends none.
    pub fn set_cache_control(&self, value: Option<&str>) {
        self.state().cache_control = value.map(str::to_owned);
    }

    /// How `/keys` answers from now on.
    pub fn set_keys_mode(&self, mode: Mode) {
        self.state().keys_mode = mode;
    }

    /// How the discovery document answers from now on.
    pub fn set_discovery_mode(&self, mode: Mode) {
        self.state().discovery_mode = mode;
    }

    /// Both paths at once (the whole identity provider down, slow or back).
    pub fn set_mode(&self, mode: Mode) {
        let mut state = self.state();
        state.keys_mode = mode;
        state.discovery_mode = mode;
    }

    /// Requests received on `path` so far (any mode).
    pub fn requests(&self, path: &str) -> usize {
        self.state().by_path.get(path).copied().unwrap_or(0)
    }

    /// Requests received on `path` while it was in a mode labelled `mode` (see [`Mode::label`]).
    pub fn requests_in(&self, path: &str, mode: Mode) -> usize {
        self.state()
            .by_mode
            .get(&(path.to_owned(), mode.label()))
            .copied()
            .unwrap_or(0)
    }

    /// Polls until `requests_in(path, mode) >= at_least`; returns whether it got there in time.
    pub async fn wait_for_requests(
        &self,
        path: &str,
        mode: Mode,
        at_least: usize,
        timeout: Duration,
    ) -> bool {
        self.wait_until(timeout, || self.requests_in(path, mode) >= at_least)
            .await
    }

    /// Polls until `requests(path) >= at_least` (any mode); returns whether it got there in time.
    /// With a short timeout and a count that must not be reached, this checks that no further
    /// request arrives (e.g. a fetch started in the background but not yet sent).
    pub async fn wait_for_total_requests(
        &self,
        path: &str,
        at_least: usize,
        timeout: Duration,
    ) -> bool {
        self.wait_until(timeout, || self.requests(path) >= at_least)
            .await
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    scheme: &str,
    addr: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // A discovery document is served under any issuer path, and counted as DISCOVERY_PATH.
    let path = match req.uri().path() {
        p if p.ends_with(DISCOVERY_PATH) => DISCOVERY_PATH.to_owned(),
        p => p.to_owned(),
    };
    // Decide everything at arrival, under the lock: a mode switch never splits one answer.
    let (mode, body_normal, cache_control) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let (mode, body) = match path.as_str() {
            DISCOVERY_PATH => (
                s.discovery_mode,
                json!({ "issuer": s.issuer, "jwks_uri": format!("{scheme}://{addr}{KEYS_PATH}") })
                    .to_string(),
            ),
            KEYS_PATH => (s.keys_mode, s.jwks.clone()),
            MOVED_KEYS_PATH => (Mode::Normal, s.jwks.clone()),
            _ => {
                *s.by_path.entry(path.clone()).or_default() += 1;
                return Ok(Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::new()))
                    .expect("a valid response"));
            }
        };
        *s.by_path.entry(path.clone()).or_default() += 1;
        *s.by_mode.entry((path.clone(), mode.label())).or_default() += 1;
        (mode, body, s.cache_control.clone())
    };
    let (status, body) = match mode {
        Mode::Normal => (200, body_normal),
        Mode::Slow(delay) => {
            tokio::time::sleep(delay).await;
            (200, body_normal)
        }
        Mode::Unavailable => (503, "the identity provider is down (test)".to_owned()),
        Mode::Empty if path == KEYS_PATH => (200, r#"{"keys":[]}"#.to_owned()),
        Mode::Empty => (200, "{}".to_owned()),
        Mode::Malformed => (200, r#"{"keys":[{"kty":"RSA","#.to_owned()),
        Mode::RedirectTo(to) => {
            return Ok(Response::builder()
                .status(302)
                .header("location", format!("{scheme}://{to}{MOVED_KEYS_PATH}"))
                .body(Full::new(Bytes::new()))
                .expect("a valid response"));
        }
    };
    let mut response = Response::builder().status(status).header(
        "content-type",
        if status == 200 {
            "application/json"
        } else {
            "text/plain"
        },
    );
    if let Some(value) = cache_control {
        response = response.header("cache-control", value);
    }
    Ok(response
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response"))
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The demo key with `kid` from `examples/demo-keys/jwks.json`, as a single JWK.
pub fn demo_jwk(kid: &str) -> Value {
    let text = std::fs::read_to_string(crate::common::jwks_path()).expect("reading the demo JWKS");
    let set: Value = serde_json::from_str(&text).expect("the demo JWKS is JSON");
    set["keys"]
        .as_array()
        .expect("the demo JWKS has a keys array")
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("examples/demo-keys/jwks.json has no key {kid:?}"))
        .clone()
}

/// `stepgate-demo-rsa-1` (RS256); its private key is `examples/demo-keys/demo-rsa-private.pem`.
pub fn rsa_jwk() -> Value {
    demo_jwk(stepgate::demo::DEMO_RSA_KID)
}

/// `stepgate-demo-ec-1` (ES256, P-256); its private key is `examples/demo-keys/demo-ec-private.pem`.
pub fn ec_jwk() -> Value {
    demo_jwk(stepgate::demo::DEMO_EC_KID)
}

/// `jwk` with an Entra-style `issuer` property (e.g. `https://login.microsoftonline.com/{tenantid}/v2.0`).
pub fn with_issuer(mut jwk: Value, issuer: &str) -> Value {
    jwk["issuer"] = json!(issuer);
    jwk
}

/// `{"keys": [...]}`.
pub fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}
