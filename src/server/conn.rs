//! Accepted connections: at most so many at once, accept errors without a busy loop, each handed
//! to a serving worker, TLS when configured, and each wrapped so that HTTP/2 batches small
//! answers into one write.
//!
//! [`accept`] accepts only while fewer than `--max-connections` are open; past that, new
//! clients wait in the kernel's listen backlog until one closes. A source address already
//! holding `--max-connections-per-source` has its new connection closed on accept, so that one
//! client (or one compromised pod) cannot take every slot from the proxies. A connection that sends nothing
//! within `--handshake-timeout` is closed: otherwise idle sockets, which cost an attacker nothing,
//! could hold every slot and keep Envoy from reconnecting. When `accept` fails because the
//! process or the system is out of file descriptors (`EMFILE`, `ENFILE`), the listener stays
//! readable and every retry fails at once: retrying without a pause would spin a core and starve
//! the calls in flight, so it pauses first.
//!
//! Each accepted socket leaves the accepting runtime's reactor and goes, through [`Dispatch`], to
//! the worker holding the fewest open connections (server/workers.rs); [`incoming`], on that
//! worker's runtime, registers it there and yields it to the worker's gRPC server.
//!
//! With TLS, each handshake runs in its own task (a slow client must not hold up the accept loop),
//! holding its connection slot and bounded by `--handshake-timeout`. What the handshake
//! established (the client certificate's names) travels with the connection as [`PeerInfo`],
//! which each call finds in its request extensions.
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
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
    time::Sleep,
};
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, wrappers::ReceiverStream};

use super::tls::{self, ClientIdentity, Tls};
use crate::telemetry::{
    metrics,
    throttle::{Throttle, WARNING_PERIOD},
};

/// Pause after an accept error, so that running out of descriptors does not become a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// `--listen`.
    Main,
    /// `--admin-listen`: where the policy may allow `explain`.
    Admin,
}

/// What is known of a connection's peer; each call routed to tonic finds it in its request
/// extensions (server/calls.rs).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub listener: ListenerKind,
    /// With mutual TLS: the verified client certificate's names.
    pub client: Option<Arc<ClientIdentity>>,
}

/// How a listener accepts connections.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    /// Most connections open at once (handshakes in progress included).
    pub max: usize,
    /// Most of them from one source address; 0 for no bound but `max`.
    pub max_per_source: usize,
    pub kind: ListenerKind,
}

/// How a worker takes up the connections handed to it.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Time for a client to send its first bytes, or to finish its TLS handshake.
    pub handshake_timeout: Duration,
    pub tls: Option<Arc<Tls>>,
}

/// A connection a listener accepted, on its way to the worker that serves it. The socket is out
/// of the accepting runtime's reactor, so that the worker's own runtime polls it.
#[derive(Debug)]
pub struct Accepted {
    stream: std::net::TcpStream,
    remote: SocketAddr,
    kind: ListenerKind,
    slot: Slot,
}

/// What an open connection holds: one of its listener's `--max-connections` slots, one of its
/// source's, and one unit of its worker's load.
#[derive(Debug)]
struct Slot {
    _permit: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
    load: Option<Arc<AtomicUsize>>,
}

/// The connections each source address has open on one listener (the metrics listener's too).
#[derive(Debug)]
pub(crate) struct Sources {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl Sources {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// One more connection from `address`, unless it holds `max` already. An IPv4 client of a
    /// dual-stack listener (`::ffff:a.b.c.d`) counts as `a.b.c.d`.
    pub(crate) fn take(self: &Arc<Self>, address: IpAddr) -> Option<SourceSlot> {
        let address = address.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(address).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: Arc::clone(self),
            address,
        })
    }
}

/// One connection's share of its source address's bound.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    sources: Arc<Sources>,
    address: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self
            .sources
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(load) = &self.load {
            load.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Hands each accepted connection to the worker with the fewest open connections (the next in
/// turn among equals). A connection stays on its worker until it closes.
#[derive(Debug)]
pub struct Dispatch {
    workers: Vec<(mpsc::UnboundedSender<Accepted>, Arc<AtomicUsize>)>,
    turn: AtomicUsize,
}

impl Dispatch {
    /// A dispatch to `count` workers, and the receiving end of each worker's queue.
    pub fn new(count: usize) -> (Self, Vec<mpsc::UnboundedReceiver<Accepted>>) {
        let (workers, queues) = (0..count.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                ((tx, Arc::new(AtomicUsize::new(0))), rx)
            })
            .unzip();
        let dispatch = Self {
            workers,
            turn: AtomicUsize::new(0),
        };
        (dispatch, queues)
    }

    /// Each worker's open connections, in worker order.
    pub fn loads(&self) -> Vec<Arc<AtomicUsize>> {
        self.workers
            .iter()
            .map(|(_, load)| Arc::clone(load))
            .collect()
    }

    /// Gives `accepted` to the least loaded worker still running; drops it (closing the
    /// connection) if none is.
    fn send(&self, mut accepted: Accepted) {
        let count = self.workers.len();
        let first = self.turn.fetch_add(1, Ordering::Relaxed) % count;
        let mut order: Vec<usize> = (0..count).map(|i| (first + i) % count).collect();
        order.sort_by_key(|&i| self.workers[i].1.load(Ordering::Relaxed));
        for i in order {
            let (queue, load) = &self.workers[i];
            load.fetch_add(1, Ordering::Relaxed);
            if let Some(previous) = accepted.slot.load.replace(Arc::clone(load)) {
                previous.fetch_sub(1, Ordering::Relaxed);
            }
            match queue.send(accepted) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => accepted = back,
            }
        }
    }
}

/// Accepts the listener's connections, at most `max` open at once (see the module docs), and
/// hands them to the workers through `dispatch`. Runs until `stop` turns true, then closes the
/// listener.
pub fn accept(
    listener: TcpListener,
    options: AcceptOptions,
    dispatch: Arc<Dispatch>,
    mut stop: watch::Receiver<bool>,
) {
    let AcceptOptions {
        max,
        max_per_source,
        kind,
    } = options;
    let slots = Arc::new(Semaphore::new(max.max(1)));
    let sources = (max_per_source > 0).then(|| Sources::new(max_per_source));
    tokio::spawn(async move {
        let warnings = Throttle::new(WARNING_PERIOD);
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => permit.expect("the semaphore is never closed"),
                () = &mut stopped => return,
            };
            let connection = tokio::select! {
                connection = listener.accept() => connection,
                () = &mut stopped => return,
            };
            let error = match connection.and_then(|(stream, remote)| {
                let _ = stream.set_nodelay(true);
                let _ = keep_alive(&stream);
                Ok((stream.into_std()?, remote))
            }) {
                Ok((stream, remote)) => {
                    let source = sources.as_ref().map(|s| s.take(remote.ip()));
                    if let Some(None) = source {
                        // Closed at once, its slot free for the next client.
                        drop(stream);
                        refused(remote, max_per_source);
                        continue;
                    }
                    let slot = Slot {
                        _permit: permit,
                        _source: source.flatten(),
                        load: None,
                    };
                    dispatch.send(Accepted {
                        stream,
                        remote,
                        kind,
                        slot,
                    });
                    continue;
                }
                Err(error) => error,
            };
            metrics::global().record_accept_error();
            if let Some(unlogged) = warnings.admit() {
                tracing::warn!(
                    %error,
                    unlogged,
                    "accepting a gRPC connection failed; pausing before the next"
                );
            }
            drop(permit);
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
        }
    });
}

/// The connections handed to one worker, ready to serve: registered with the calling task's
/// runtime, through their TLS handshake if configured, each closed if it sends nothing within
/// `handshake_timeout`. Must be called on the worker's runtime; the task it starts ends when the
/// stream is dropped.
pub fn incoming(
    mut handed: mpsc::UnboundedReceiver<Accepted>,
    options: WorkerOptions,
) -> impl Stream<Item = Batched> {
    let WorkerOptions {
        handshake_timeout,
        tls,
    } = options;
    let (ready, stream) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                next = handed.recv() => next,
                () = ready.closed() => return,
            };
            let Some(Accepted {
                stream,
                remote,
                kind,
                slot,
            }) = next
            else {
                return;
            };
            let stream = match TcpStream::from_std(stream) {
                Ok(stream) => stream,
                Err(error) => {
                    metrics::global().record_accept_error();
                    tracing::warn!(%error, %remote, "cannot register an accepted connection");
                    continue;
                }
            };
            let peer = PeerInfo {
                remote: Some(remote),
                listener: kind,
                client: None,
            };
            let Some(tls) = &tls else {
                let connection =
                    Batched::new(Io::Plain(stream), slot, Some(handshake_timeout), peer);
                if ready.send(connection).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tls.acceptor();
            let mutual = tls.mutual();
            let ready = ready.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                let stream = match handshake.await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => return handshake_failed(remote, &error.to_string()),
                    Err(_) => return handshake_failed(remote, "timed out"),
                };
                let peer = PeerInfo {
                    client: mutual.then(|| Arc::new(tls::client_identity(stream.get_ref().1))),
                    ..peer
                };
                // The same deadline again for the first decrypted bytes (the HTTP/2 preface): a
                // client that completes the handshake and then says nothing must not keep its
                // slot.
                let connection = Batched::new(
                    Io::Tls(Box::new(stream)),
                    slot,
                    Some(handshake_timeout),
                    peer,
                );
                let _ = ready.send(connection).await;
            });
        }
    });
    ReceiverStream::new(stream)
}

/// Counts a connection closed for its source's share, and says so at most once per
/// [`WARNING_PERIOD`].
fn refused(remote: SocketAddr, max: usize) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    metrics::global().record_connection_refused();
    if let Some(unlogged) = WARNINGS.admit() {
        tracing::warn!(
            source = %remote.ip(),
            max,
            unlogged,
            "closed a connection: its source address holds --max-connections-per-source already (later ones within 10 s are only counted)"
        );
    }
}

/// Counts a failed TLS handshake, and says so at most once per [`WARNING_PERIOD`] (a
/// client can fail handshakes as fast as it can connect).
fn handshake_failed(remote: SocketAddr, error: &str) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    metrics::global().record_tls_handshake_error();
    match WARNINGS.admit() {
        Some(unlogged) => tracing::warn!(
            %remote,
            error,
            unlogged,
            "TLS handshake failed (later failures within 10 s are only counted)"
        ),
        None => tracing::debug!(%remote, error, "TLS handshake failed"),
    }
}

/// How long a connection may go without a byte from its peer before the kernel probes it.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between unanswered probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes that close the connection.
const KEEPALIVE_PROBES: u32 = 2;
/// How long data sent may stay unacknowledged before the connection is closed: the same
/// `KEEPALIVE_IDLE + KEEPALIVE_PROBES × KEEPALIVE_INTERVAL` (50 s) as an idle dead peer.
const UNACKNOWLEDGED_FOR: Duration = Duration::from_secs(50);

/// Finds a dead peer in the kernel: TCP keep-alive probes after [`KEEPALIVE_IDLE`] of silence,
/// every [`KEEPALIVE_INTERVAL`], closing after [`KEEPALIVE_PROBES`] unanswered (about 50 s), and
/// `TCP_USER_TIMEOUT` for data left unacknowledged as long. This replaces HTTP/2 keep-alive
/// pings, which cost a clock read and a lock on every frame received.
fn keep_alive(stream: &TcpStream) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_FOR))
}

/// The byte stream under a connection.
#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection that reports `is_write_vectored() == false` (see the module docs), holding one
/// of the listener's connection slots until it closes.
#[derive(Debug)]
pub struct Batched {
    io: Io,
    peer: PeerInfo,
    _slot: Slot,
    /// Until the client's HTTP/2 preface and the header of its first frame have arrived: when
    /// the connection is closed if they have not.
    first_bytes_by: Option<Pin<Box<Sleep>>>,
    /// Bytes still to come before `first_bytes_by` is lifted.
    opening_left: usize,
    /// The client's frames, followed for the SETTINGS among them.
    frames: Frames,
}

/// The frames a client sends, followed header by header (their payloads skipped) to count its
/// SETTINGS frames. Each one that changes the initial window size makes the HTTP/2 server walk
/// every open stream of the connection: about 19 µs with 1024 streams open, for a 15-byte frame.
/// Clients send a few in a connection's life (Envoy one, a gRPC library a few more as it sizes
/// its windows); past [`MAX_SETTINGS`] the connection is closed.
#[derive(Debug)]
pub(crate) struct Frames {
    /// Bytes of the client preface (`PRI * HTTP/2.0…`, not a frame) still to come.
    preface_left: usize,
    /// The frame header being read, and how much of it has come.
    header: [u8; 9],
    pub(crate) have: usize,
    /// Payload bytes of the current frame still to come.
    pub(crate) skip: usize,
    /// SETTINGS frames (not acknowledgements) the client sent.
    pub(crate) settings: u32,
}

/// SETTINGS frames a client may send on one connection.
pub(crate) const MAX_SETTINGS: u32 = 100;

impl Default for Frames {
    fn default() -> Self {
        Self {
            preface_left: 24,
            header: [0; 9],
            have: 0,
            skip: 0,
            settings: 0,
        }
    }
}

impl Frames {
    /// Follows `bytes`, the next the client sent; `false` once it sent more SETTINGS frames than
    /// [`MAX_SETTINGS`].
    pub(crate) fn follow(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let skipped = if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                n
            } else if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                n
            } else {
                let n = (9 - self.have).min(bytes.len());
                self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                if self.have == 9 {
                    self.have = 0;
                    let [l0, l1, l2, kind, flags, ..] = self.header;
                    self.skip = u32::from_be_bytes([0, l0, l1, l2]) as usize;
                    const SETTINGS: u8 = 0x4;
                    const ACK: u8 = 0x1;
                    if kind == SETTINGS && flags & ACK == 0 {
                        self.settings += 1;
                        if self.settings > MAX_SETTINGS {
                            return false;
                        }
                    }
                }
                n
            };
            bytes = &bytes[skipped..];
        }
        true
    }
}

/// The client connection preface (RFC 9113 §3.4: 24 bytes, then a SETTINGS frame, whose header
/// is 9 bytes): a client that has not sent this much has not opened an HTTP/2 connection, and
/// one byte of it must not hold a connection slot for longer than the handshake timeout.
const OPENING_BYTES: usize = 24 + 9;

impl Batched {
    fn new(io: Io, slot: Slot, first_bytes_within: Option<Duration>, peer: PeerInfo) -> Self {
        metrics::global().connection_opened();
        Self {
            io,
            peer,
            _slot: slot,
            first_bytes_by: first_bytes_within.map(|d| Box::pin(tokio::time::sleep(d))),
            opening_left: OPENING_BYTES,
            frames: Frames::default(),
        }
    }
}

impl Batched {
    /// What is known of the client.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl Drop for Batched {
    fn drop(&mut self) {
        metrics::global().connection_closed();
    }
}

impl Io {
    fn read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for Batched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).read(cx, buf);
        let this = &mut *self;
        if let Some(deadline) = &mut this.first_bytes_by {
            match read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    let came = buf.filled().len() - before;
                    this.opening_left = this.opening_left.saturating_sub(came);
                    if this.opening_left == 0 {
                        this.first_bytes_by = None;
                    }
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client did not open HTTP/2 within the handshake timeout",
                    )));
                }
                _ => {}
            }
        }
        if let Poll::Ready(Ok(())) = read
            && !this.frames.follow(&buf.filled()[before..])
        {
            settings_flood(this.peer.remote);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the client sent more SETTINGS frames than an HTTP/2 client does",
            )));
        }
        read
    }
}

/// Counts a connection closed for its SETTINGS frames, and says so at most once per
/// [`WARNING_PERIOD`].
fn settings_flood(remote: Option<SocketAddr>) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    metrics::global().record_settings_flood();
    if let Some(unlogged) = WARNINGS.admit() {
        tracing::warn!(
            remote = remote.map(tracing::field::display),
            max = MAX_SETTINGS,
            unlogged,
            "closed a connection whose client sent more HTTP/2 SETTINGS frames than the most a client sends (later ones within 10 s are only counted)"
        );
    }
}

impl AsyncWrite for Batched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    // `poll_write_vectored` keeps its default (write the first non-empty slice), which h2 never
    // calls when `is_write_vectored` is false.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(max: usize) -> Arc<Sources> {
        Sources::new(max)
    }

    #[test]
    fn a_source_holds_at_most_its_bound_and_gets_each_slot_back_when_a_connection_closes() {
        let sources = sources(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = sources.take(a).expect("first");
        let _second = sources.take(a).expect("second");
        assert!(sources.take(a).is_none(), "a third from the same source");
        assert!(sources.take(b).is_some(), "another source is not affected");
        drop(first);
        let _third = sources.take(a).expect("a slot came back");
        assert!(sources.take(a).is_none());
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_counts_as_its_ipv4_address() {
        let sources = sources(1);
        let _v4 = sources.take("192.0.2.7".parse().unwrap()).expect("first");
        assert!(
            sources.take("::ffff:192.0.2.7".parse().unwrap()).is_none(),
            "the mapped address is the same source"
        );
    }

    #[test]
    fn a_source_with_no_connection_left_is_forgotten() {
        let sources = sources(3);
        let held: Vec<_> = (0..100u8)
            .map(|i| sources.take(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(sources.open.lock().unwrap().len(), 100);
        drop(held);
        assert!(sources.open.lock().unwrap().is_empty());
    }
}
