//! `--canned`: the transport floor below tonic. An HTTP/2 server (the `h2` crate, as tonic and
//! hyper use it) that answers every stream with the same precomputed gRPC answer, the bytes of
//! `CheckResponse{status: OK}` framed once at start, and trailers `grpc-status: 0`. It reads each
//! request's body to its end (as a gRPC server must before it answers) and never decodes it: no
//! protobuf, no routing, no service layer. What stepgate costs above it is everything a real
//! ext_authz server does beyond moving HTTP/2 frames.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use tokio::net::{TcpListener, TcpStream};

/// The answer's body: the gRPC message prefix (not compressed, length) and the message.
pub fn framed(message: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    Bytes::from(body)
}

pub async fn serve(addr: SocketAddr, body: Bytes) -> Result<(), String> {
    serve_with(addr, body, connection).await
}

/// Accepts on `addr` and serves each connection (`TCP_NODELAY`) with `connection`, in a task of
/// its own.
pub async fn serve_with<F, Fut>(addr: SocketAddr, body: Bytes, connection: F) -> Result<(), String>
where
    F: Fn(TcpStream, Bytes) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("listening on {local}");
    loop {
        let (socket, _) = listener
            .accept()
            .await
            .map_err(|e| format!("accept failed: {e}"))?;
        let _ = socket.set_nodelay(true);
        tokio::spawn(connection(socket, body.clone()));
    }
}

async fn connection(socket: TcpStream, body: Bytes) {
    // The same HTTP/2 settings as stepgate's server (src/server/mod.rs).
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_concurrent_streams(1024);
    let Ok(mut conn) = builder.handshake::<_, Bytes>(socket).await else {
        return;
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    // Polling `accept` drives the connection: every stream's frames go out through it.
    while let Some(Ok((request, mut respond))) = conn.accept().await {
        let (body, trailers) = (body.clone(), trailers.clone());
        tokio::spawn(async move {
            let mut incoming = request.into_body();
            while let Some(chunk) = incoming.data().await {
                let Ok(chunk) = chunk else { return };
                let _ = incoming.flow_control().release_capacity(chunk.len());
            }
            let head = Response::builder()
                .status(200)
                .header("content-type", "application/grpc")
                .body(())
                .expect("a static response head");
            let Ok(mut send) = respond.send_response(head, false) else {
                return;
            };
            if send.send_data(body, false).is_ok() {
                let _ = send.send_trailers(trailers);
            }
        });
    }
}
