//! `--canned-hyper`: the canned floor ([`crate::canned`]) served through hyper's HTTP/2 server,
//! with the settings stepgate's server uses (src/server/calls.rs), instead of on bare `h2`. The
//! same precomputed answer, the request read to its end and never decoded. Set beside `--canned`,
//! it tells what hyper's server costs per call (its service call, its stream task, its body
//! pipe) from what stepgate's own code costs above it.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// One message frame, then the `grpc-status: 0` trailer: stepgate's `CallBody::Unary`.
struct Unary {
    frame: Option<Bytes>,
    ok: bool,
}

impl Body for Unary {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(if let Some(data) = this.frame.take() {
            Some(Ok(Frame::data(data)))
        } else if std::mem::take(&mut this.ok) {
            let mut trailers = HeaderMap::with_capacity(1);
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            Some(Ok(Frame::trailers(trailers)))
        } else {
            None
        })
    }

    fn is_end_stream(&self) -> bool {
        self.frame.is_none() && !self.ok
    }

    fn size_hint(&self) -> SizeHint {
        // As stepgate's: a lower bound only, so that hyper adds no `content-length`.
        let mut hint = SizeHint::new();
        hint.set_lower(self.frame.as_ref().map_or(0, |f| f.len() as u64));
        hint
    }
}

pub async fn serve(addr: SocketAddr, body: Bytes) -> Result<(), String> {
    crate::canned::serve_with(addr, body, connection).await
}

async fn connection(socket: TcpStream, body: Bytes) {
    // stepgate's settings (src/server/calls.rs, `builder`).
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .keep_alive_interval(None)
        .auto_date_header(false)
        .initial_connection_window_size(1024 * 1024)
        .initial_stream_window_size(256 * 1024)
        .max_concurrent_streams(1024)
        .max_header_list_size(64 * 1024);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let body = body.clone();
        async move {
            let _ = request.into_body().collect().await;
            let mut response = Response::new(Unary {
                frame: Some(body),
                ok: true,
            });
            response
                .headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            Ok::<_, Infallible>(response)
        }
    });
    let _ = builder
        .serve_connection(TokioIo::new(socket), service)
        .await;
}
