//! The benchmark's transport floor: an Envoy ext_authz v3 `Authorization` server that answers every
//! `Check` with `OK` at once, without looking at the request.
//!
//! It runs the same stack as stepgate (tokio multi-thread runtime with one worker per available
//! CPU, tonic 0.14, envoy-types 0.7, TCP_NODELAY, the same HTTP/2 settings), so the difference
//! between the two under the same load is what stepgate's decision costs. `bench/run` starts it
//! pinned to one core and waits for the `listening on ADDR` line.
//!
//! With `--canned` it is the floor below that: HTTP/2 streams answered with precomputed bytes,
//! without tonic and without decoding ([`canned`]); with `--canned-hyper`, the same answers
//! through hyper's HTTP/2 server, as stepgate serves them ([`canned_hyper`]).

mod canned;
mod canned_hyper;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use clap::Parser;
use envoy_types::{
    ext_authz::v3::pb::{
        Authorization, AuthorizationServer, CheckRequest, CheckResponse, HttpResponse,
        OkHttpResponse,
    },
    pb::google::{
        protobuf::{Struct, Value, value::Kind},
        rpc,
    },
};
use tokio::net::TcpListener;
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

#[derive(Debug, Parser)]
#[command(
    name = "empty-authz",
    about = "ext_authz v3 server that answers OK at once"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the `listening on` line tells which).
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// Worker threads (default: the CPUs available to the process, as stepgate).
    #[arg(long)]
    workers: Option<usize>,
    /// Pad the answer with this many bytes of dynamic metadata (0: the empty answer). With about
    /// 400 the answer is as large as stepgate's ALLOW, to tell the cost of the bytes on the wire
    /// from the cost of the decision.
    #[arg(long, default_value_t = 0)]
    metadata_bytes: usize,
    /// Keep the CPU busy this many microseconds on each Check before answering (0: none). With
    /// the cost of one signature verify, the row shows what the transport alone costs at the
    /// lower rate of a server that verifies every token (fewer answers share each system call).
    #[arg(long, default_value_t = 0.0)]
    busy_micros: f64,
    /// Answer with precomputed bytes over bare HTTP/2 (the `h2` crate), never decoding a request:
    /// the floor of any gRPC server on this transport.
    #[arg(long, conflicts_with = "busy_micros")]
    canned: bool,
    /// The same precomputed answers, served through hyper's HTTP/2 server with stepgate's
    /// settings: beside `--canned`, what hyper's server costs per call.
    #[arg(long, conflicts_with_all = ["busy_micros", "canned"])]
    canned_hyper: bool,
}

#[derive(Debug, Default)]
struct Empty {
    response: CheckResponse,
    busy: Duration,
}

#[tonic::async_trait]
impl Authorization for Empty {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        busy_for(self.busy);
        Ok(Response::new(self.response.clone()))
    }
}

/// Spins (no sleep: the point is to use the CPU) for `busy`.
fn busy_for(busy: Duration) {
    if busy.is_zero() {
        return;
    }
    let start = Instant::now();
    while start.elapsed() < busy {
        std::hint::spin_loop();
    }
}

/// `CheckResponse{status: OK, ok_response: default}`, with `metadata_bytes` of padding in
/// `dynamic_metadata` when asked.
fn ok_response(metadata_bytes: usize) -> CheckResponse {
    let dynamic_metadata = (metadata_bytes > 0).then(|| Struct {
        fields: [(
            "padding".to_owned(),
            Value {
                kind: Some(Kind::StringValue("x".repeat(metadata_bytes))),
            },
        )]
        .into(),
    });
    CheckResponse {
        status: Some(rpc::Status::default()),
        dynamic_metadata,
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // As stepgate: one worker per CPU available to the process (affinity included).
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().worker_threads(workers.max(1));
    let result = Duration::try_from_secs_f64(args.busy_micros / 1e6)
        .map_err(|_| format!("--busy-micros {}: expected a number ≥ 0", args.busy_micros))
        .and_then(|busy| {
            let service = Empty {
                response: ok_response(args.metadata_bytes),
                busy,
            };
            let rt = runtime
                .build()
                .map_err(|e| format!("cannot start the runtime: {e}"))?;
            if args.canned || args.canned_hyper {
                use prost::Message as _;
                let body = canned::framed(&service.response.encode_to_vec());
                if args.canned_hyper {
                    return rt.block_on(canned_hyper::serve(args.listen, body));
                }
                return rt.block_on(canned::serve(args.listen, body));
            }
            rt.block_on(serve(args.listen, service))
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("empty-authz: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(addr: SocketAddr, service: Empty) -> Result<(), String> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    eprintln!("listening on {local}");
    // The same HTTP/2 settings as stepgate's server (src/server/mod.rs), so that only the
    // decision differs.
    Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .initial_connection_window_size(Some(1024 * 1024))
        .initial_stream_window_size(Some(256 * 1024))
        .max_concurrent_streams(Some(1024))
        .add_service(AuthorizationServer::new(service))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .map_err(|e| format!("server failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_ok_with_a_default_ok_response() {
        let response = ok_response(0);
        assert_eq!(response.status.map(|s| s.code), Some(0));
        assert!(response.dynamic_metadata.is_none());
        assert!(matches!(
            response.http_response,
            Some(HttpResponse::OkResponse(ref ok)) if *ok == OkHttpResponse::default()
        ));
    }

    #[test]
    fn busy_time_is_spent_before_answering() {
        let start = Instant::now();
        busy_for(Duration::from_millis(5));
        assert!(start.elapsed() >= Duration::from_millis(5));
    }

    /// A real gRPC client (tonic, as stepgate's tests use it) gets the canned answer: status OK,
    /// the same message the tonic floor answers.
    #[test]
    fn the_canned_floor_answers_a_grpc_client() {
        answers_a_grpc_client(|addr, body| tokio::spawn(canned::serve(addr, body)));
    }

    /// The same through hyper's HTTP/2 server.
    #[test]
    fn the_canned_floor_through_hyper_answers_a_grpc_client() {
        answers_a_grpc_client(|addr, body| tokio::spawn(canned_hyper::serve(addr, body)));
    }

    fn answers_a_grpc_client(
        start: impl FnOnce(SocketAddr, bytes::Bytes) -> tokio::task::JoinHandle<Result<(), String>>,
    ) {
        use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
        use prost::Message as _;
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let body = canned::framed(&ok_response(0).encode_to_vec());
            let _server = start(addr, body);
            let mut client = loop {
                match AuthorizationClient::connect(format!("http://{addr}")).await {
                    Ok(client) => break client,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            for _ in 0..3 {
                let answer = client
                    .check(CheckRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                assert_eq!(answer, ok_response(0));
            }
        });
    }

    #[test]
    fn padding_grows_the_encoded_answer() {
        use prost::Message as _;
        let plain = ok_response(0).encoded_len();
        let padded = ok_response(400).encoded_len();
        assert!(plain < 16, "{plain}");
        assert!((400..440).contains(&padded), "{padded}");
    }
}
