//! The HTTP side of the generator, for scenario f (HTTP through a real Envoy): an HTTP/1.1 client
//! over keep-alive connections, the upstream Envoy forwards allowed requests to (it answers 200 at
//! once), and a readiness probe for Envoy's admin `/ready`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{ACCEPT, AUTHORIZATION, HOST, HeaderValue, USER_AGENT},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpListener;

use crate::scenario::Call;

/// Requests of one run: the same method, URL and `Host`, one of the pre-built `Authorization`
/// values each (cycled by sequence number, like the gRPC payloads).
#[derive(Debug)]
pub struct HttpWorkload {
    client: Client<HttpConnector, Empty<Bytes>>,
    method: hyper::Method,
    uri: Uri,
    host: HeaderValue,
    authorizations: Vec<HeaderValue>,
}

/// An HTTP/1.1 client with keep-alive connections (opened on demand and reused, so an open loop at
/// a modest rate runs over a few long-lived connections) and TCP_NODELAY.
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(300))
        .build(connector)
}

impl HttpWorkload {
    /// `target` is `http://HOST:PORT` (Envoy's listener); `authorizations` are the encoded
    /// `Authorization` values (`scenario::encode` with `Rpc::Http`).
    pub fn new(target: &str, call: &Call, authorizations: Vec<Bytes>) -> Result<Self, String> {
        if authorizations.is_empty() {
            return Err("no request to send".into());
        }
        let uri: Uri = format!("{}{}", target.trim_end_matches('/'), call.path)
            .parse()
            .map_err(|e| format!("invalid --target {target}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "--rpc http needs an http:// target (Envoy's plain listener), got {target}"
            ));
        }
        let authorizations = authorizations
            .into_iter()
            .map(|b| HeaderValue::from_maybe_shared(b).map_err(|e| format!("bad token: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            client: client(),
            method: call
                .method
                .parse()
                .map_err(|e| format!("bad method: {e}"))?,
            uri,
            host: HeaderValue::from_static(call.host),
            authorizations,
        })
    }

    pub fn distinct_payloads(&self) -> u64 {
        self.authorizations.len() as u64
    }

    /// Sends request number `seq` and checks that the answer is 200 (reading the body to its end,
    /// so that the connection goes back to the pool).
    pub async fn call(&self, seq: u64) -> Result<(), String> {
        let auth = &self.authorizations[(seq % self.authorizations.len() as u64) as usize];
        let request = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, auth.clone())
            .header(ACCEPT, HeaderValue::from_static("application/json"))
            .header(USER_AGENT, HeaderValue::from_static("bench-client/1.0"))
            .body(Empty::new())
            .map_err(|e| format!("building the request: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("HTTP request failed: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        check_status(status, &body)
    }
}

impl crate::run::Driver for HttpWorkload {
    fn call(&self, seq: u64) -> impl Future<Output = Result<(), String>> + Send {
        HttpWorkload::call(self, seq)
    }
}

/// 200 is the right answer; anything else is an error naming the status (and the start of the
/// body, e.g. Envoy's or stepgate's reason).
pub fn check_status(status: StatusCode, body: &[u8]) -> Result<(), String> {
    if status == StatusCode::OK {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(80)]);
    let text = text.trim();
    if text.is_empty() {
        Err(format!("expected HTTP 200, got {status}"))
    } else {
        Err(format!("expected HTTP 200, got {status}: {text}"))
    }
}

/// The upstream: answers every request with an empty 200 at once, over HTTP/1.1 keep-alive.
/// Prints `listening on ADDR` on stderr once bound (`bench/run` waits for that line).
pub async fn serve_upstream(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("binding {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("upstream listening on {addr}");
    run_upstream(listener).await;
    Ok(())
}

pub async fn run_upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_request: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The body of `url` fetched with GET, which must answer 200 within `timeout` (stepgate's
/// Prometheus `/metrics`).
pub async fn get_text(url: &str, timeout: Duration) -> Result<String, String> {
    let uri: Uri = url.parse().map_err(|e| format!("invalid URL {url}: {e}"))?;
    let response = tokio::time::timeout(timeout, client().get(uri))
        .await
        .map_err(|_| format!("{url} did not answer within {timeout:?}"))?
        .map_err(|e| format!("GET {url}: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    let body = tokio::time::timeout(timeout, response.into_body().collect())
        .await
        .map_err(|_| format!("{url} did not send its body within {timeout:?}"))?
        .map_err(|e| format!("reading {url}: {e}"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| format!("{url} answered a body that is not UTF-8"))
}

/// Polls `url` with GET until it answers 200 (Envoy's admin `/ready` does once it is LIVE).
pub async fn wait_ok(url: &str, timeout: Duration) -> Result<(), String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid --url {url}: {e}"))?;
    let client = client();
    let deadline = Instant::now() + timeout;
    loop {
        let last = match client.get(uri.clone()).await {
            Ok(r) if r.status() == StatusCode::OK => return Ok(()),
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{url} did not answer 200 within {timeout:?} (last: {last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        run::{RunOptions, open_loop},
        scenario::{self, Rpc, Scenario},
    };

    async fn upstream() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(run_upstream(listener));
        format!("http://{addr}")
    }

    #[test]
    fn only_200_is_right() {
        assert_eq!(check_status(StatusCode::OK, b""), Ok(()));
        assert_eq!(
            check_status(StatusCode::FORBIDDEN, b""),
            Err("expected HTTP 200, got 403 Forbidden".into())
        );
        let err =
            check_status(StatusCode::UNAUTHORIZED, b"{\"error\":\"invalid_token\"}\n").unwrap_err();
        assert!(err.contains("401 Unauthorized: {\"error\""), "{err}");
        assert!(check_status(StatusCode::SERVICE_UNAVAILABLE, &[b'x'; 500]).is_err());
    }

    #[tokio::test]
    async fn open_loop_over_http_keep_alive() {
        let target = upstream().await;
        let call = Scenario::F.call();
        let auth = vec![scenario::encode(Rpc::Http, &call, "tok")];
        let workload = Arc::new(HttpWorkload::new(&target, &call, auth).unwrap());
        let options = RunOptions {
            warmup: Duration::from_millis(50),
            duration: Duration::from_millis(300),
            max_requests: None,
            server_pid: None,
            peer_pids: Vec::new(),
            rss_every: None,
        };
        let m = open_loop(workload, 1_000.0, 1_000, &options).await.unwrap();
        assert_eq!(m.recorder.errors, 0, "{:?}", m.recorder.error_samples);
        let n = m.recorder.requests();
        assert!((250..=350).contains(&n), "{n} requests");
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_and_readiness_times_out() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = format!("http://127.0.0.1:{port}");
        let call = Scenario::F.call();
        let w = HttpWorkload::new(&target, &call, vec![Bytes::from_static(b"Bearer t")]).unwrap();
        assert!(w.call(0).await.unwrap_err().contains("HTTP request failed"));
        assert!(
            wait_ok(&format!("{target}/ready"), Duration::from_millis(200))
                .await
                .is_err()
        );
        let up = upstream().await;
        assert_eq!(
            wait_ok(&format!("{up}/ready"), Duration::from_secs(5)).await,
            Ok(())
        );
        assert!(HttpWorkload::new("https://x", &call, vec![Bytes::new()]).is_err());
    }
}
