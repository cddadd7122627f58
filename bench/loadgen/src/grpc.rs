//! The gRPC side of the generator: pre-framed request bodies sent as they are over raw HTTP/2
//! streams (the `h2` crate: no gRPC client stack, no per-request message building or encoding),
//! over several connections in turn, each answer checked.
//!
//! A tonic client spent about 28 µs of the generator's core per request (its channel hands each
//! call to a buffer task, then to hyper's dispatch task, then to the connection); the generator,
//! not the server, was then the limit of every closed-loop row. Here a call writes its HEADERS
//! and DATA into the connection's shared state and wakes the connection task once.

use std::time::{Duration, Instant};

use bytes::{BufMut as _, Bytes, BytesMut};
use h2::client::SendRequest;
use http::{HeaderValue, Method, Request, Uri, header::CONTENT_TYPE};
use tokio::net::TcpStream;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::scenario::{Expect, Rpc, validate};

/// One HTTP/2 connection to the server under test.
pub type Connection = SendRequest<Bytes>;

/// What every request of a run shares: the connections, the RPC, the payloads and the expectation.
#[derive(Debug)]
pub struct Workload {
    clients: Vec<Connection>,
    uri: Uri,
    rpc: Rpc,
    /// Each payload behind its gRPC message prefix.
    frames: Vec<Bytes>,
    expect: Expect,
}

impl Workload {
    pub fn new(
        connections: Vec<Connection>,
        rpc: Rpc,
        payloads: Vec<Bytes>,
        expect: Expect,
    ) -> Self {
        assert!(!connections.is_empty() && !payloads.is_empty());
        let path = rpc
            .grpc_path()
            .expect("a gRPC workload needs a gRPC method (not --rpc http)");
        Self {
            clients: connections,
            uri: Uri::builder()
                .scheme("http")
                .authority("stepgate")
                .path_and_query(path)
                .build()
                .expect("a valid URI"),
            rpc,
            frames: payloads.iter().map(|p| frame(p)).collect(),
            expect,
        }
    }

    pub fn distinct_payloads(&self) -> u64 {
        self.frames.len() as u64
    }

    /// Sends request number `seq` (its payload and connection are chosen round-robin by `seq`) and
    /// checks the answer.
    pub async fn call(&self, seq: u64) -> Result<(), String> {
        let client = self.clients[(seq % self.clients.len() as u64) as usize].clone();
        let frame = self.frames[(seq % self.frames.len() as u64) as usize].clone();
        let mut client = client
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        let (response, mut stream) = client
            .send_request(request, false)
            .map_err(|e| format!("sending: {e}"))?;
        stream
            .send_data(frame, true)
            .map_err(|e| format!("sending: {e}"))?;
        let response = response.await.map_err(|e| format!("answer: {e}"))?;
        if response.status() != 200 {
            return Err(format!("HTTP {}", response.status()));
        }
        if let Some(status) = response.headers().get("grpc-status") {
            return Err(grpc_error(status, response.headers().get("grpc-message")));
        }
        let mut body = response.into_body();
        let mut message = Bytes::new();
        let mut pieces: Option<BytesMut> = None;
        while let Some(data) = body.data().await {
            let data = data.map_err(|e| format!("answer body: {e}"))?;
            let _ = body.flow_control().release_capacity(data.len());
            match &mut pieces {
                Some(buf) => buf.extend_from_slice(&data),
                None if message.is_empty() => message = data,
                None => {
                    let mut buf = BytesMut::from(&message[..]);
                    buf.extend_from_slice(&data);
                    pieces = Some(buf);
                }
            }
        }
        if let Some(buf) = pieces {
            message = buf.freeze();
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| format!("answer trailers: {e}"))?
            .unwrap_or_default();
        match trailers.get("grpc-status") {
            Some(status) if status == "0" => {}
            Some(status) => return Err(grpc_error(status, trailers.get("grpc-message"))),
            None => return Err("an answer without grpc-status".into()),
        }
        if message.len() < 5 || message[0] != 0 {
            return Err("an answer that is not one uncompressed gRPC message".into());
        }
        validate(self.rpc, self.expect, &message[5..])
    }
}

fn grpc_error(status: &HeaderValue, message: Option<&HeaderValue>) -> String {
    format!(
        "gRPC {}: {}",
        String::from_utf8_lossy(status.as_bytes()),
        message.map_or(std::borrow::Cow::Borrowed(""), |m| String::from_utf8_lossy(
            m.as_bytes()
        ))
    )
}

/// `payload` behind the gRPC message prefix (not compressed, its length).
fn frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(payload.len()).expect("a payload below 4 GiB"));
    out.put_slice(payload);
    out.freeze()
}

impl crate::run::Driver for Workload {
    fn call(&self, seq: u64) -> impl Future<Output = Result<(), String>> + Send {
        Workload::call(self, seq)
    }
}

/// `count` separate HTTP/2 connections (h2c, prior knowledge) to `target`
/// (`http://host:port`), with TCP_NODELAY, each driven by a task of its own.
pub async fn connect(target: &str, count: usize) -> Result<Vec<Connection>, String> {
    let authority = target
        .strip_prefix("http://")
        .ok_or_else(|| format!("--target {target}: expected http://host:port"))?
        .trim_end_matches('/');
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(authority))
            .await
            .map_err(|_| format!("connecting to {target}: timed out"))?
            .map_err(|e| format!("connecting to {target}: {e}"))?;
        tcp.set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(1024 * 1024)
            .initial_connection_window_size(4 * 1024 * 1024)
            // As hyper does: h2 would otherwise send any number of calls before the server's
            // SETTINGS say how many it takes, and the server refuses those past its limit.
            .initial_max_send_streams(100)
            .handshake(tcp)
            .await
            .map_err(|e| format!("HTTP/2 handshake with {target}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        connections.push(client);
    }
    Ok(connections)
}

/// Polls gRPC health until `service` is SERVING, or fails after `timeout`.
pub async fn wait_serving(target: &str, service: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match health(target, service).await {
            Ok(true) => return Ok(()),
            Ok(false) => "NOT_SERVING".to_owned(),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(format!(
                "{target} did not report SERVING for {service:?} within {timeout:?} (last: {last})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health(target: &str, service: &str) -> Result<bool, String> {
    let channel = Endpoint::from_shared(target.to_owned())
        .map_err(|e| format!("invalid --target {target}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| format!("health: {s}"))?
        .into_inner()
        .status;
    Ok(status == ServingStatus::Serving as i32)
}
