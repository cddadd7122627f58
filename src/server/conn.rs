//! Accepted connections: at most so many at once, accept errors without a busy loop, and each
//! wrapped so that HTTP/2 batches small answers into one write.
//!
//! [`incoming`] accepts only while fewer than `--max-connections` are open; past that, new
//! clients wait in the kernel's listen backlog until one closes. A connection that sends nothing
//! within `--handshake-timeout` is closed: otherwise idle sockets, which cost an attacker nothing,
//! could hold every slot and keep Envoy from reconnecting. When `accept` fails because the
//! process or the system is out of file descriptors (`EMFILE`, `ENFILE`), the listener stays
//! readable and every retry fails at once: retrying without a pause would spin a core and starve
//! the calls in flight, so it pauses first.
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
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::Sleep,
};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::telemetry::metrics;

/// Pause after an accept error, so that running out of descriptors does not become a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// At most one warning per this period about failing accepts (they are also counted).
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The listener's connections, at most `max` open at once, each closed if it sends nothing within
/// `handshake_timeout` (see the module docs). The accept loop runs in its own task and ends,
/// closing the listener, when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    max: usize,
    handshake_timeout: Duration,
) -> impl Stream<Item = io::Result<Batched>> {
    let (accepted, stream) = mpsc::channel(1);
    let slots = Arc::new(Semaphore::new(max.max(1)));
    tokio::spawn(async move {
        let mut last_warned: Option<Instant> = None;
        loop {
            let slot = tokio::select! {
                slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
                () = accepted.closed() => return,
            };
            let connection = tokio::select! {
                connection = listener.accept() => connection,
                () = accepted.closed() => return,
            };
            match connection {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = Batched::new(stream, slot, handshake_timeout);
                    if accepted.send(Ok(connection)).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    metrics::global().record_accept_error();
                    if last_warned.is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_EVERY) {
                        tracing::warn!(%error, "accepting a gRPC connection failed; pausing before the next");
                        last_warned = Some(Instant::now());
                    }
                    drop(slot);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    });
    ReceiverStream::new(stream)
}

/// A TCP connection that reports `is_write_vectored() == false` (see the module docs), holding
/// one of the listener's connection slots until it closes.
#[derive(Debug)]
pub struct Batched {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the first bytes arrive: when the connection is closed if none have.
    first_bytes_by: Option<Pin<Box<Sleep>>>,
}

impl Batched {
    fn new(stream: TcpStream, slot: OwnedSemaphorePermit, handshake_timeout: Duration) -> Self {
        metrics::global().connection_opened();
        Self {
            stream,
            _slot: slot,
            first_bytes_by: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
        }
    }
}

impl Drop for Batched {
    fn drop(&mut self) {
        metrics::global().connection_closed();
    }
}

impl Connected for Batched {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Batched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut self.first_bytes_by {
            match read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_bytes_by = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing within the handshake timeout",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Batched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    // `poll_write_vectored` keeps its default (write the first non-empty slice), which h2 never
    // calls when `is_write_vectored` is false.
    fn is_write_vectored(&self) -> bool {
        false
    }
}
