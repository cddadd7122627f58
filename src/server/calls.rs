//! Each connection's HTTP/2 server, and where its calls go.
//!
//! A worker serves its connections with hyper's HTTP/2 server (the one tonic uses, with the same
//! settings: flow-control windows, the stream limit, the header-list limit,
//! graceful shutdown). Calls are routed on their path:
//! - ext_authz `Check` is read, decided and answered here ([`ExtAuthz`]): its one message is
//!   taken from the request's DATA frame without a copy (`grpc_message::UnaryReader`), and its
//!   answer leaves as one precomputed frame and the `grpc-status: 0` trailer. This is most of what
//!   a server does per request, and the path every proxied request takes; tonic's per-call layers
//!   (its service stack, router, codec and streaming body) cost more than the decision itself
//!   (docs/performance.md, "The transport floor").
//! - every other path goes to tonic's router: `Decide`, gRPC health, reflection and the admin
//!   API, each call with the connection's [`PeerInfo`] in its extensions as tonic put it there.
//!
//! Both get the deadline tonic's server gave them: `--request-timeout`, or the client's shorter
//! `grpc-timeout`. A call to tonic's router still running then ends with `CANCELLED` ("Timeout
//! expired"); a `Check` not decided shortly before it is a `503 deadline_exceeded` denial, which
//! Envoy reads as a denial rather than as a failure `failure_mode_allow` would let through.

use std::{
    cell::Cell,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, header::CONTENT_TYPE};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{body::Incoming, server::conn::http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    sync::{Notify, mpsc, watch},
    time::Instant,
};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Status, body::Body as TonicBody, codegen::Service, service::Routes};

use super::{
    TransportLimits,
    check_callers::CheckCallers,
    conn::{Batched, PeerInfo},
    decide::{self, DECIDE_PATH},
    ext_authz::{self, CHECK_PATH, ExtAuthz},
    grpc_message,
};
use crate::telemetry::{
    metrics,
    throttle::{Throttle, WARNING_PERIOD},
};

/// What one worker serves: the `Check` service and tonic's router for the rest.
#[derive(Clone)]
pub struct Calls {
    pub check: ExtAuthz,
    /// How a `Decide` call's message is read before tonic decodes it.
    pub decide: DecideReading,
    pub routes: Routes,
    /// `--request-timeout`.
    pub timeout: Duration,
    /// What request bodies may hold together (`--max-buffered-bytes`); `Check` charges it in
    /// its reader, tonic's calls through [`Charged`].
    pub budget: Arc<grpc_message::Budget>,
    /// Who may call `Check`, tested once per connection.
    pub check_callers: Arc<CheckCallers>,
}

/// A `Decide` call's body is read here, as `Check`'s is, before tonic's router decodes its
/// message: one whole message or a DENY (`400 malformed_request` for two, none or one cut
/// short, `413 request_too_large` past `--max-decide-message-bytes`, `503 overloaded` past the
/// buffer budget), never a gRPC error, and never a second message that a reader taking the
/// last one would decide instead. tonic then decodes the one message, as before.
#[derive(Clone)]
pub struct DecideReading {
    pub authorizer: Arc<super::authorizer::Authorizer>,
    /// `--max-decide-message-bytes`.
    pub max_message_bytes: usize,
}

/// A request body for tonic's router whose unfinished message is charged to the process's
/// budget: tonic buffers a message whole before decoding it, so without it many streams each
/// sending most of a large `Decide` message would hold that much memory each. Only the bytes of
/// the message not yet whole are charged (`grpc_message::Unfinished`): a message arriving in one
/// frame (a health check, a `Decide` under 16 KiB) takes nothing and is served even when others
/// hold the whole budget, and a whole message's bytes are given back once tonic can decode it.
/// Past the budget the body fails, and tonic ends the call with `RESOURCE_EXHAUSTED`. A unary
/// call gives its charge back at its deadline at the latest; a streaming call, which has none,
/// has each message's: see [`MessageDeadline`].
pub struct Charged {
    inner: Incoming,
    held: grpc_message::Held,
    unfinished: grpc_message::Unfinished,
    /// A streaming call's: when its unfinished message must be whole.
    deadline: Option<(Arc<MessageDeadline>, Duration)>,
}

impl Charged {
    fn new(
        inner: Incoming,
        budget: Arc<grpc_message::Budget>,
        deadline: Option<(Arc<MessageDeadline>, Duration)>,
    ) -> Self {
        Self {
            inner,
            held: grpc_message::Held::new(budget),
            unfinished: grpc_message::Unfinished::default(),
            deadline,
        }
    }
}

/// Why a streaming call whose message came too slowly is ended.
pub const SLOW_MESSAGE: &str =
    "a request message did not arrive whole within --request-timeout of its first byte";

/// When a streaming call's unfinished message must be whole: `--request-timeout` after its first
/// byte. Set and cleared by the call's body ([`Charged`]) as its frames pass, and kept by the
/// stream's own task ([`Streams`]), which then fails the body (its charge given back, the
/// service reading it woken to an error) and drops the stream's answer. Not a timer in the body:
/// a service that stops reading its requests (its answers not taken by the client) no longer
/// polls the body, and the charge on the message it pulled in would stay for as long as the
/// client keeps the stream.
#[derive(Debug, Default)]
pub struct MessageDeadline {
    at: std::sync::Mutex<Option<Instant>>,
    changed: Notify,
    /// The deadline passed: the body fails when next polled (and is woken for it).
    expired: std::sync::atomic::AtomicBool,
    /// The task waiting on the body, if it waits.
    reader: std::sync::Mutex<Option<std::task::Waker>>,
    /// When the client must have taken the call's answer so far: set when an answer is ready
    /// and hyper has not come back for more (it waits for the client's flow-control window),
    /// cleared when it does ([`CallBody::Streaming`]). A stream whose client never gives its
    /// window room would otherwise keep the answers tonic's service made for it, for as long as
    /// the connection lives.
    answer_at: std::sync::Mutex<Option<Instant>>,
    answer_changed: Notify,
}

impl MessageDeadline {
    /// Fails the body: it gives its charge back and ends with an error when next polled, and the
    /// task reading it is woken for it.
    fn expire(&self) {
        self.expired.store(true, Relaxed);
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(reader) = reader {
            reader.wake();
        }
    }

    fn set(&self, at: Option<Instant>) {
        *self
            .at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = at;
        self.changed.notify_one();
    }

    fn get(&self) -> Option<Instant> {
        *self
            .at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns once the deadline has passed with a message still unfinished.
    async fn passed(&self) {
        passed(&self.at, &self.changed).await;
    }

    fn owe_answer(&self, at: Option<Instant>) {
        let mut slot = self
            .answer_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *slot != at {
            *slot = at;
            drop(slot);
            self.answer_changed.notify_one();
        }
    }

    /// Returns once an answer has waited for its client past its time.
    async fn answer_stuck(&self) {
        passed(&self.answer_at, &self.answer_changed).await;
    }
}

/// Returns once the instant in `slot` has passed while still set there (`changed` is notified
/// whenever it is set or cleared).
async fn passed(slot: &std::sync::Mutex<Option<Instant>>, changed: &Notify) {
    let get = || {
        *slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    loop {
        let changed = changed.notified();
        match get() {
            None => changed.await,
            Some(at) => {
                tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep_until(at) => {
                        if get().is_some_and(|now| now <= Instant::now()) {
                            return;
                        }
                    }
                }
            }
        }
    }
}

impl HttpBody for Charged {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some((deadline, _)) = &this.deadline
            && deadline.expired.load(Relaxed)
        {
            this.held.hold(0);
            let refused = Status::deadline_exceeded(SLOW_MESSAGE);
            return Poll::Ready(Some(Err(Box::new(refused))));
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                if let Some((deadline, _)) = &this.deadline {
                    *deadline
                        .reader
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
        };
        if let Some(data) = frame.data_ref() {
            let ended_before = this.unfinished.ended();
            let unfinished = this.unfinished.push(data);
            if !this.held.hold(unfinished) {
                let refused = Status::resource_exhausted(grpc_message::OVER_BUDGET);
                return Poll::Ready(Some(Err(Box::new(refused))));
            }
            if let Some((deadline, within)) = &this.deadline {
                // A message begun in this frame (after one that ended in it, or after none)
                // starts its own time.
                if unfinished == 0 {
                    deadline.set(None);
                } else if deadline.get().is_none() || this.unfinished.ended() != ended_before {
                    deadline.set(Some(Instant::now() + *within));
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves the connections `incoming` yields until `closing` turns true, then stops taking new
/// ones and returns once every open connection has finished its calls (each is told to go away:
/// HTTP/2 GOAWAY, the calls in flight answered).
pub async fn serve(
    incoming: impl Stream<Item = Batched>,
    calls: Calls,
    limits: &TransportLimits,
    closing: watch::Receiver<bool>,
) {
    let calls = Arc::new(calls);
    // Every connection task holds a sender; once all are dropped, `recv` returns `None`.
    let (open, mut all_closed) = mpsc::channel::<Infallible>(1);
    let mut incoming = std::pin::pin!(incoming);
    let closed = closing.clone();
    let mut closed = std::pin::pin!(async move {
        let mut closed = closed;
        let _ = closed.wait_for(|closing| *closing).await;
    });
    loop {
        let connection = tokio::select! {
            connection = incoming.next() => connection,
            () = &mut closed => break,
        };
        let Some(connection) = connection else { break };
        let activity = Arc::new(Activity::default());
        let service = Connection {
            may_check: calls.check_callers.allows(connection.peer()),
            peer: connection.peer().clone(),
            calls: Arc::clone(&calls),
            activity: Arc::clone(&activity),
        };
        let streams = Streams {
            activity: Arc::clone(&activity),
            remote: connection.peer().remote,
        };
        let served = builder(limits, streams).serve_connection(TokioIo::new(connection), service);
        let (open, mut closing) = (open.clone(), closing.clone());
        let (idle_timeout, drain) = (limits.idle_timeout, limits.request_timeout + DRAIN_GRACE);
        let first_call_within = limits.handshake_timeout;
        let max_age = jittered(limits.max_connection_age);
        tokio::spawn(async move {
            let _open = open;
            let mut served = std::pin::pin!(served);
            let closed = async move {
                let _ = closing.wait_for(|closing| *closing).await;
            };
            let result = tokio::select! {
                result = served.as_mut() => Some(result),
                () = closed => None,
                () = activity.idle_for(first_call_within, idle_timeout) => {
                    tracing::debug!("an idle gRPC connection is closed");
                    None
                }
                () = async { tokio::time::sleep(max_age.expect("guarded")).await }, if max_age.is_some() => {
                    tracing::debug!("a gRPC connection reached its maximum age");
                    None
                }
                () = activity.unread.notified() => None,
            };
            // Told to go away (HTTP/2 GOAWAY), the connection finishes the calls in flight; no
            // call outlives --request-timeout, and a connection still opening or a stream that
            // never ends (a health Watch) is dropped once that has passed.
            let result = match result {
                Some(result) => result,
                None => {
                    served.as_mut().graceful_shutdown();
                    match tokio::time::timeout(drain, served).await {
                        Ok(result) => result,
                        Err(_) => {
                            tracing::debug!(
                                "a gRPC connection still open after {drain:?} of drain is dropped"
                            );
                            Ok(())
                        }
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "a gRPC connection ended with an error");
            }
        });
    }
    drop(open);
    let _ = all_closed.recv().await;
}

/// `age` give or take a tenth, so that the connections opened together (a proxy's, at its start)
/// do not all go away at once; `None` for zero (connections never age out).
fn jittered(age: Duration) -> Option<Duration> {
    if age.is_zero() {
        return None;
    }
    // Not for secrecy: spread only. The clock's nanoseconds, mixed.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = u64::from(nanos.wrapping_mul(2_654_435_761)) % 2001; // 0..=2000
    Some(age.mul_f64(0.9 + spread as f64 / 10_000.0))
}

/// The HTTP/2 settings of every connection (tonic's, as stepgate configured them before), and
/// the executor of its streams.
fn builder(limits: &TransportLimits, streams: Streams) -> http2::Builder<Streams> {
    let mut builder = http2::Builder::new(streams);
    builder
        .timer(TokioTimer::new())
        // No HTTP/2 keep-alive pings: with them hyper reads the clock and takes a lock on every
        // frame received. A dead peer is found by TCP keep-alive instead (`conn::keep_alive`),
        // an idle live one by `--idle-timeout`.
        .keep_alive_interval(None)
        // A gRPC answer has no use for a `Date` header; hyper would format and encode one per
        // response.
        .auto_date_header(false)
        // Envoy multiplexes many Checks over few connections: a roomy connection window and a
        // stream limit that still bounds one misbehaving client.
        .initial_connection_window_size(1024 * 1024)
        .initial_stream_window_size(256 * 1024)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(64 * 1024);
    builder
}

/// How long past `--request-timeout` a connection told to go away may take to finish, and a
/// unary call's answer may take to reach its client.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// The calls whose answers are streams, which stay open as long as the client wants: gRPC health
/// `Watch` and server reflection. Every other call is unary.
const STREAMING: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// When a stream must be over.
#[derive(Debug)]
enum StreamEnd {
    /// A unary call's: its deadline, and a second for its answer to reach the client.
    By(Instant),
    /// A streaming call's: when the client ends it (or the connection closes), or a message of
    /// it is unfinished past its deadline.
    Open(Arc<MessageDeadline>),
}

thread_local! {
    /// The end of the stream hyper hands to the executor next. hyper calls [`Connection::call`]
    /// as it makes a stream's future and hands that future over at once (`H2Stream::new(
    /// service.call(req), …)`, then `execute_h2stream`), on the connection's thread: the call
    /// sets it, [`Streams::execute`] takes it.
    static NEXT_STREAM_ENDS: Cell<Option<StreamEnd>> = const { Cell::new(None) };
}

/// hyper's executor for one connection's streams: each runs as a task of its own (as with
/// `TokioExecutor`), and a unary call's stream that is not over by its deadline and a second is
/// dropped — its answer discarded, the stream reset — and its connection told to go away
/// (HTTP/2 GOAWAY: the calls in flight are answered, the other unread answers dropped at their
/// own deadlines).
///
/// The answer is written once the client's HTTP/2 flow-control window has room for it. A client
/// that never gives it room (a window of 0, never updated) would otherwise have each of its
/// streams hold its answer, the request's headers and the stream's state (about 1.4 KiB)
/// for as long as the connection lives: `--max-concurrent-streams` per connection, over every
/// connection a client may open, without sending more than their requests.
/// `--max-buffered-bytes` does not see it (it counts requests, not answers), and a stream whose
/// answer head is sent no longer keeps the connection from being idle. A client that does not take its answers is broken or
/// hostile either way; its connection goes.
#[derive(Clone)]
struct Streams {
    activity: Arc<Activity>,
    remote: Option<std::net::SocketAddr>,
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        // Without a call made just before: not hyper's order for a stream, or hyper's
        // `execute_upgrade` (a CONNECT request, which no gRPC call is). The shortest end a call
        // can have.
        let ends = NEXT_STREAM_ENDS.take().unwrap_or_else(|| {
            StreamEnd::By(Instant::now() + Duration::from_secs(1) + DRAIN_GRACE)
        });
        let deadline = match ends {
            StreamEnd::By(deadline) => deadline,
            StreamEnd::Open(message) => {
                let (activity, remote) = (Arc::clone(&self.activity), self.remote);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stream => {}
                        () = message.passed() => {
                            message.expire();
                            slow_message(remote);
                        }
                        // Its answers not taken: dropped with the stream, as a unary call's.
                        () = message.answer_stuck() => {
                            unread(remote);
                            activity.unread.notify_one();
                        }
                    }
                });
                return;
            }
        };
        let (activity, remote) = (Arc::clone(&self.activity), self.remote);
        tokio::spawn(async move {
            // A call in flight is answered before its deadline (a `Check` a fifth of its time
            // before, any other call at it): what is left past it and a second is an answer
            // waiting for the client.
            if tokio::time::timeout_at(deadline, stream).await.is_err() {
                unread(remote);
                activity.unread.notify_one();
            }
        });
    }
}

/// Says, at most every 10 s, that a streaming call was reset for a message that did not arrive
/// whole in time.
fn slow_message(remote: Option<std::net::SocketAddr>) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    if let Some(unlogged) = WARNINGS.admit() {
        tracing::warn!(
            remote = remote.map(tracing::field::display),
            unlogged,
            "a streaming call was reset: a request message did not arrive whole within \
             --request-timeout of its first byte"
        );
    }
}

/// Counts a call whose answer its client did not take, and says so at most every 10 s.
fn unread(remote: Option<std::net::SocketAddr>) {
    static WARNINGS: Throttle = Throttle::new(WARNING_PERIOD);
    metrics::global().record_unread_answer();
    if let Some(unlogged) = WARNINGS.admit() {
        tracing::warn!(
            remote = remote.map(tracing::field::display),
            unlogged,
            "a client did not take a call's answer by its deadline: the answer is dropped, its stream reset and the connection told to go away (later ones within 10 s are only counted)"
        );
    }
}

/// One connection's calls.
#[derive(Clone)]
struct Connection {
    peer: PeerInfo,
    /// Whether the peer may call `Check` (`--check-from`, `--check-client-san`).
    may_check: bool,
    calls: Arc<Calls>,
    activity: Arc<Activity>,
}

/// What a connection's calls have done.
#[derive(Default)]
struct Activity {
    /// Calls in flight (the low 32 bits) and calls ever started (the high 32, wrapping), in one
    /// word: a call writes it once when it starts and once when it ends, and only the worker
    /// serving the connection does.
    calls: AtomicU64,
    /// Signalled when a call's answer was not taken by its client in time ([`Streams`]): the
    /// connection is then told to go away.
    unread: Notify,
}

const ONE_CALL: u64 = 1;
const ONE_STARTED: u64 = 1 << 32;

impl Activity {
    fn start(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(ONE_CALL | ONE_STARTED, Relaxed);
        CallGuard(Arc::clone(self))
    }

    /// Returns once a whole `period` has passed with no call in flight and none started (the
    /// connection has been idle between one and two periods), or `first` has passed without a
    /// first call: a client that opens a connection and never calls on it would otherwise hold
    /// one of `--max-connections` for a whole `period`, at the cost of a few bytes.
    async fn idle_for(&self, first: Duration, period: Duration) {
        let mut seen = self.calls.load(Relaxed);
        let mut wait = first.min(period);
        loop {
            tokio::time::sleep(wait).await;
            wait = period;
            let now = self.calls.load(Relaxed);
            if now == seen && now & (ONE_STARTED - 1) == 0 {
                return;
            }
            seen = now;
        }
    }
}

/// A call in flight, until its answer's head is sent.
struct CallGuard(Arc<Activity>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(ONE_CALL, Relaxed);
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<Response<CallBody>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = Response<CallBody>;
    type Error = Infallible;
    type Future = CallFuture;

    fn call(&self, mut request: Request<Incoming>) -> CallFuture {
        let timeout = deadline(request.headers(), self.calls.timeout);
        let guard = self.activity.start();
        let now = Instant::now();
        let message_deadline = STREAMING
            .contains(&request.uri().path())
            .then(|| Arc::new(MessageDeadline::default()));
        NEXT_STREAM_ENDS.set(Some(match &message_deadline {
            Some(message) => StreamEnd::Open(Arc::clone(message)),
            None => StreamEnd::By(now + timeout + DRAIN_GRACE),
        }));
        if request.uri().path() == CHECK_PATH {
            if !self.may_check {
                let refused = self.calls.check.caller_not_allowed(self.peer.remote);
                return Box::pin(answered(std::future::ready(refused), guard));
            }
            // The call's future holds the whole decision (2.6 KiB): boxed where it is made,
            // it is copied once, not again into its wrapper, its box and its first poll.
            let check =
                self.calls
                    .check
                    .clone()
                    .call_by(request, now.into_std(), answer_by(timeout));
            return Box::pin(answered(Box::pin(check), guard));
        }
        request.extensions_mut().insert(self.peer.clone());
        if request.uri().path() == DECIDE_PATH && !ext_authz::compressed(request.headers()) {
            let call = read_decide(
                request,
                self.calls.decide.clone(),
                Arc::clone(&self.calls.budget),
                self.calls.routes.clone(),
            );
            return Box::pin(within(timeout, call, guard));
        }
        let budget = Arc::clone(&self.calls.budget);
        let answer_within = self.calls.timeout;
        let answers = message_deadline.clone();
        let deadline = message_deadline.map(|message| (message, answer_within));
        let request = request.map(|inner| Charged::new(inner, budget, deadline));
        let mut routes = self.calls.routes.clone();
        let call = async move {
            let Ok(()) =
                std::future::poll_fn(|cx| Service::<Request<Charged>>::poll_ready(&mut routes, cx))
                    .await;
            let Ok(response) = routes.call(request).await;
            match answers {
                // Owed from the head on, until hyper asks for the body.
                Some(watch) => {
                    watch.owe_answer(Some(Instant::now() + answer_within));
                    response.map(|body| CallBody::Streaming {
                        body,
                        watch,
                        within: answer_within,
                    })
                }
                None => response.map(CallBody::Tonic),
            }
        };
        Box::pin(within(timeout, call, guard))
    }
}

/// A `Decide` call ([`DecideReading`]): its one message read, then handed to tonic's router in
/// a body of its own; or its refusal.
async fn read_decide(
    request: Request<Incoming>,
    reading: DecideReading,
    budget: Arc<grpc_message::Budget>,
    mut routes: Routes,
) -> Response<CallBody> {
    use crate::decision::Reason;
    let started = std::time::Instant::now();
    let (parts, body) = request.into_parts();
    let reader = grpc_message::UnaryReader::with_budget(reading.max_message_bytes, budget);
    let refused = |status, reason, message| {
        unary(decide::refusal_frame(
            &reading.authorizer,
            started,
            status,
            reason,
            message,
        ))
    };
    let message = match ext_authz::read_unary(body, reader).await {
        Ok(grpc_message::Unary::Message(message)) => message,
        Ok(grpc_message::Unary::TooLarge(_)) => {
            return refused(
                413,
                Reason::RequestTooLarge,
                "the DecideRequest is larger than stepgate reads (--max-decide-message-bytes)",
            );
        }
        Ok(grpc_message::Unary::Malformed(why)) => {
            return refused(400, Reason::MalformedRequest, why);
        }
        Ok(grpc_message::Unary::Overloaded) => {
            return refused(503, Reason::Overloaded, grpc_message::OVER_BUDGET);
        }
        Err(error) => {
            tracing::debug!(%error, "a Decide call's body failed before it ended");
            return status(Status::cancelled("the request body failed"));
        }
    };
    let request = Request::from_parts(
        parts,
        CallBody::Unary {
            frame: Some(grpc_message::frame(&message)),
            ok: false,
        },
    );
    let Ok(()) =
        std::future::poll_fn(|cx| Service::<Request<CallBody>>::poll_ready(&mut routes, cx)).await;
    let Ok(response) = routes.call(request).await;
    response.map(CallBody::Tonic)
}

/// The call's time: `limit`, or the client's `grpc-timeout` when shorter.
fn deadline(headers: &HeaderMap, limit: Duration) -> Duration {
    headers
        .get("grpc-timeout")
        .and_then(|v| grpc_message::parse_timeout(v.as_bytes()))
        .map_or(limit, |asked| asked.min(limit))
}

/// When a `Check` with `timeout` to go is answered at the latest: a fifth of it, at most 50 ms,
/// before its deadline (the time the answer takes to reach the proxy, whose own clock started
/// first).
fn answer_by(timeout: Duration) -> Duration {
    timeout - (timeout / 5).min(Duration::from_millis(50))
}

/// A `Check` call: it answers by its deadline itself ([`ExtAuthz::call_by`]).
async fn answered(
    call: impl Future<Output = Response<CallBody>>,
    _in_flight: CallGuard,
) -> Result<Response<CallBody>, Infallible> {
    Ok(call.await)
}

/// `call`, ended with `CANCELLED` if it takes longer than `timeout`.
async fn within(
    timeout: Duration,
    call: impl Future<Output = Response<CallBody>>,
    _in_flight: CallGuard,
) -> Result<Response<CallBody>, Infallible> {
    Ok(tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| status(Status::cancelled("Timeout expired"))))
}

/// A trailers-only gRPC answer: `status` in the response headers, no message.
pub fn status(status: Status) -> Response<CallBody> {
    status.into_http::<TonicBody>().map(CallBody::Tonic)
}

/// The trailer of every unary answer, named without an allocation.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A successful unary answer: `frame` (a message behind its prefix), then `grpc-status: 0`.
pub fn unary(frame: Bytes) -> Response<CallBody> {
    let mut response = Response::new(CallBody::Unary {
        frame: Some(frame),
        ok: true,
    });
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// An answer's body.
pub enum CallBody {
    /// One message frame, then the `grpc-status: 0` trailer (`ok` until it is sent).
    Unary { frame: Option<Bytes>, ok: bool },
    /// Whatever tonic's services answered.
    Tonic(TonicBody),
    /// A streaming call's answers, each to be taken by its client within `within`
    /// ([`MessageDeadline::answer_stuck`]).
    Streaming {
        body: TonicBody,
        watch: Arc<MessageDeadline>,
        within: Duration,
    },
}

impl HttpBody for CallBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        match self.get_mut() {
            Self::Unary { frame, ok } => Poll::Ready(if let Some(data) = frame.take() {
                Some(Ok(Frame::data(data)))
            } else if std::mem::take(ok) {
                let mut trailers = HeaderMap::with_capacity(1);
                trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
                Some(Ok(Frame::trailers(trailers)))
            } else {
                None
            }),
            Self::Tonic(body) => Pin::new(body).poll_frame(cx),
            Self::Streaming {
                body,
                watch,
                within,
            } => {
                // hyper asks for more only once the client's window has room for it.
                let polled = Pin::new(body).poll_frame(cx);
                let owed = matches!(&polled, Poll::Ready(Some(Ok(frame))) if frame.is_data());
                watch.owe_answer(owed.then(|| Instant::now() + *within));
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Unary { frame, ok } => frame.is_none() && !ok,
            Self::Tonic(body) | Self::Streaming { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            // Not exact on purpose: hyper would add a `content-length` (two allocations per
            // answer) that gRPC does not use.
            Self::Unary { frame, .. } => {
                let mut hint = SizeHint::new();
                hint.set_lower(frame.as_ref().map_or(0, |f| f.len() as u64));
                hint
            }
            Self::Tonic(body) | Self::Streaming { body, .. } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connections_age_is_spread_over_a_tenth_either_side_and_zero_is_never() {
        assert_eq!(jittered(Duration::ZERO), None);
        let age = Duration::from_secs(1800);
        let ages: Vec<Duration> = (0..200)
            .map(|_| {
                std::thread::sleep(Duration::from_micros(37));
                jittered(age).expect("an age")
            })
            .collect();
        assert!(
            ages.iter()
                .all(|a| (age.mul_f64(0.9)..=age.mul_f64(1.1)).contains(a)),
            "{ages:?}"
        );
        let distinct: std::collections::BTreeSet<_> = ages.iter().collect();
        assert!(
            distinct.len() > 20,
            "spread: {} distinct ages",
            distinct.len()
        );
    }
}
