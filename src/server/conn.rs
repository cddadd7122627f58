//! Accepted connections, wrapped so that HTTP/2 batches small answers into one write.
//!
//! h2 copies a DATA frame into its write buffer only if the payload is below a threshold: 256
//! bytes when the socket says it supports vectored writes, 1024 bytes when it does not. A larger
//! frame is "chained" instead, and h2 then flushes before it buffers the next frame. An ALLOW
//! with identity headers and dynamic metadata is 300–600 bytes, so on a vectored socket every
//! answer became its own `writev` (one syscall and one TCP segment per Check: the biggest single
//! cost in the profile). Declaring the socket non-vectored keeps those answers in the buffer,
//! where answers finished in the same poll leave in one `write`. Frames above 1024 bytes (rare:
//! large Decide answers) are still chained, as before.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP connection that reports `is_write_vectored() == false` (see the module docs).
#[derive(Debug)]
pub struct Batched(pub TcpStream);

impl Connected for Batched {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

impl AsyncRead for Batched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Batched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    // `poll_write_vectored` keeps its default (write the first non-empty slice), which h2 never
    // calls when `is_write_vectored` is false.
    fn is_write_vectored(&self) -> bool {
        false
    }
}
