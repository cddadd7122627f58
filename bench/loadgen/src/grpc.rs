//! The gRPC side of the generator: pre-encoded request bodies sent as they are (no per-request
//! message building or encoding), over several HTTP/2 connections in turn, each answer checked.

use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _, Bytes};
use tonic::{
    Request, Status,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::scenario::{Expect, Rpc, validate};

/// A codec that sends bytes already encoded and returns the response bytes undecoded.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len)))
    }
}

/// What every request of a run shares: the connections, the RPC, the payloads and the expectation.
#[derive(Debug)]
pub struct Workload {
    clients: Vec<Grpc<Channel>>,
    path: PathAndQuery,
    rpc: Rpc,
    payloads: Vec<Bytes>,
    expect: Expect,
}

impl Workload {
    pub fn new(channels: Vec<Channel>, rpc: Rpc, payloads: Vec<Bytes>, expect: Expect) -> Self {
        assert!(!channels.is_empty() && !payloads.is_empty());
        Self {
            clients: channels.into_iter().map(Grpc::new).collect(),
            path: PathAndQuery::from_static(
                rpc.grpc_path()
                    .expect("a gRPC workload needs a gRPC method (not --rpc http)"),
            ),
            rpc,
            payloads,
            expect,
        }
    }

    pub fn distinct_payloads(&self) -> u64 {
        self.payloads.len() as u64
    }

    /// Sends request number `seq` (its payload and connection are chosen round-robin by `seq`) and
    /// checks the answer.
    pub async fn call(&self, seq: u64) -> Result<(), String> {
        let mut client = self.clients[(seq % self.clients.len() as u64) as usize].clone();
        let payload = self.payloads[(seq % self.payloads.len() as u64) as usize].clone();
        client
            .ready()
            .await
            .map_err(|e| format!("connection not ready: {e}"))?;
        let response = client
            .unary(Request::new(payload), self.path.clone(), RawCodec)
            .await
            .map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))?;
        validate(self.rpc, self.expect, response.get_ref())
    }
}

impl crate::run::Driver for Workload {
    fn call(&self, seq: u64) -> impl Future<Output = Result<(), String>> + Send {
        Workload::call(self, seq)
    }
}

/// `count` separate HTTP/2 connections to `target`, with TCP_NODELAY.
pub async fn connect(target: &str, count: usize) -> Result<Vec<Channel>, String> {
    let endpoint = Endpoint::from_shared(target.to_owned())
        .map_err(|e| format!("invalid --target {target}: {e}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        channels.push(
            endpoint
                .connect()
                .await
                .map_err(|e| format!("connecting to {target}: {e}"))?,
        );
    }
    Ok(channels)
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
    let channel = connect(target, 1).await?.remove(0);
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
