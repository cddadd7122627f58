//! The gRPC wire as stepgate serves it, over a real socket with a raw HTTP/2 client (the `h2`
//! crate), below what any gRPC library would send: a `Check` message cut across DATA frames,
//! two messages in one unary call, a body that never ends, a method nobody serves, and a client
//! that resets the streams it opens.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Server, Spawn, demo_policy_path, entra, envoy_check, mint};
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, check_response::HttpResponse};
use h2::client::SendRequest;
use prost::Message as _;
use tokio::net::TcpStream;

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";

/// An HTTP/2 connection to the server, its driver running in the background.
async fn connect(server: &Server) -> SendRequest<Bytes> {
    let port = server.url().rsplit(':').next().unwrap().to_owned();
    let tcp = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connects");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    client.ready().await.expect("ready")
}

fn call(path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

/// A gRPC message frame (not compressed).
fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend((message.len() as u32).to_be_bytes());
    out.extend(message);
    out
}

/// What a call came back with: the `grpc-status` (from the headers of a trailers-only answer, or
/// the trailers), and the message bytes.
struct Answer {
    grpc_status: String,
    body: Vec<u8>,
}

/// Sends `chunks` as the call's DATA frames (the last ending the stream) and reads the answer.
async fn send(
    client: &mut SendRequest<Bytes>,
    request: http::Request<()>,
    chunks: Vec<Vec<u8>>,
) -> Answer {
    let (response, mut stream) = client.send_request(request, false).expect("sends");
    let count = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        stream
            .send_data(Bytes::from(chunk), i + 1 == count)
            .expect("sends data");
    }
    if count == 0 {
        stream
            .send_data(Bytes::new(), true)
            .expect("ends the stream");
    }
    read(response).await
}

async fn read(response: h2::client::ResponseFuture) -> Answer {
    let response = response.await.expect("an answer");
    assert_eq!(response.status(), 200);
    let in_headers = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut received = response.into_body();
    let mut body = Vec::new();
    while let Some(data) = received.data().await {
        let data = data.expect("data");
        let _ = received.flow_control().release_capacity(data.len());
        body.extend_from_slice(&data);
    }
    let in_trailers = received
        .trailers()
        .await
        .expect("trailers")
        .and_then(|t| t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()));
    Answer {
        grpc_status: in_headers.or(in_trailers).expect("a grpc-status"),
        body,
    }
}

/// The `CheckResponse` in an answer's one frame.
fn check_response(answer: &Answer) -> CheckResponse {
    assert_eq!(answer.grpc_status, "0", "an OK gRPC answer");
    let len = u32::from_be_bytes(answer.body[1..5].try_into().unwrap()) as usize;
    assert_eq!(
        (answer.body[0], answer.body.len()),
        (0, 5 + len),
        "one frame"
    );
    CheckResponse::decode(&answer.body[5..]).expect("a CheckResponse")
}

/// The denial's HTTP status and body; `None` for an ALLOW.
fn denial(response: &CheckResponse) -> Option<(i32, String)> {
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => {
            Some((d.status.as_ref().map_or(0, |s| s.code), d.body.clone()))
        }
        _ => None,
    }
}

fn allowed_check() -> Vec<u8> {
    let token = mint(&entra(&[], &[]));
    envoy_check(
        "GET",
        "app.example",
        "/api/orders/1",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .encode_to_vec()
}

async fn serve(args: &[&str]) -> Server {
    serve_on(args, false).await
}

/// As [`serve`], with the metrics listener.
async fn serve_metered(args: &[&str]) -> Server {
    serve_on(args, true).await
}

async fn serve_on(args: &[&str], metrics: bool) -> Server {
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: args.iter().map(|a| a.to_string()).collect(),
            metrics,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    server
}

#[tokio::test]
async fn a_check_cut_across_data_frames_is_decided_as_one_sent_whole() {
    let server = serve(&[]).await;
    let mut client = connect(&server).await;
    let body = frame(&allowed_check());
    let whole = send(&mut client, call(CHECK, &[]), vec![body.clone()]).await;
    let whole = check_response(&whole);
    assert_eq!(denial(&whole), None, "ALLOW: {whole:?}");
    // Cut inside the prefix, inside the message, and one byte at a time at the end.
    let mut chunks = vec![body[..3].to_vec(), body[3..40].to_vec()];
    chunks.extend(body[40..].chunks(1).map(<[u8]>::to_vec));
    let cut = send(&mut client, call(CHECK, &[]), chunks).await;
    assert_eq!(check_response(&cut), whole);
}

#[tokio::test]
async fn a_unary_check_with_two_messages_or_none_is_a_400_denial() {
    let records =
        std::env::temp_dir().join(format!("stepgate-refusals-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&records);
    let server = serve(&["--records", records.to_str().unwrap()]).await;
    let mut client = connect(&server).await;
    let one = frame(&allowed_check());
    for (case, chunks) in [
        ("two messages", vec![one.clone(), one.clone()]),
        (
            "two messages in one frame",
            vec![[one.clone(), one.clone()].concat()],
        ),
        ("no message", vec![]),
        ("a cut message", vec![one[..one.len() - 1].to_vec()]),
    ] {
        let answer = send(&mut client, call(CHECK, &[]), chunks).await;
        let response = check_response(&answer);
        let (status, body) = denial(&response).unwrap_or_else(|| panic!("{case}: allowed"));
        assert_eq!(status, 400, "{case}");
        assert!(body.contains("malformed_request"), "{case}: {body}");
    }
    // The connection is still good.
    let answer = send(&mut client, call(CHECK, &[]), vec![one]).await;
    assert_eq!(denial(&check_response(&answer)), None);
    // Each refusal is recorded like a decision (the message was never read: no request in it).
    let reasons = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|record| record["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = reasons(&std::fs::read_to_string(&records).unwrap_or_default());
        if seen.len() >= 5 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen.iter().filter(|r| *r == "malformed_request").count(),
        4,
        "{seen:?}"
    );
    let _ = std::fs::remove_file(&records);
}

/// A body that never ends holds its call only until just before the deadline (the client's
/// shorter `grpc-timeout`, else `--request-timeout`; a fifth of it, at most 50 ms, before): then
/// the call is a `503 deadline_exceeded` denial, which Envoy reads as a denial and not as a failure
/// its `failure_mode_allow` would let through.
#[tokio::test]
async fn a_body_that_never_ends_is_denied_just_before_the_deadline() {
    let server = serve(&["--request-timeout", "1s"]).await;
    let mut client = connect(&server).await;
    let body = frame(&allowed_check());
    for (timeout, at_least, below) in [
        (
            Some("300m"),
            Duration::from_millis(250),
            Duration::from_millis(290),
        ),
        (None, Duration::from_millis(950), Duration::from_secs(4)),
        // Longer than --request-timeout: the server's limit wins.
        (
            Some("10S"),
            Duration::from_millis(950),
            Duration::from_secs(4),
        ),
        // Not the spec's grammar: ignored.
        (
            Some("+1m"),
            Duration::from_millis(950),
            Duration::from_secs(4),
        ),
    ] {
        let headers: Vec<(&str, &str)> = timeout.map(|t| ("grpc-timeout", t)).into_iter().collect();
        let started = Instant::now();
        let (response, mut stream) = client
            .send_request(call(CHECK, &headers), false)
            .expect("sends");
        stream
            .send_data(Bytes::copy_from_slice(&body[..20]), false)
            .expect("sends data");
        let answer = read(response).await;
        let took = started.elapsed();
        let (status, body) = denial(&check_response(&answer)).expect("denied");
        assert_eq!(status, 503, "{timeout:?}: {body}");
        assert!(body.contains("deadline_exceeded"), "{timeout:?}: {body}");
        assert!(
            took >= at_least && took < below,
            "{timeout:?}: ended after {took:?}"
        );
        drop(stream);
    }
}

#[tokio::test]
async fn methods_nobody_serves_are_unimplemented_and_decide_still_answers_on_the_port() {
    let server = serve(&[]).await;
    let mut client = connect(&server).await;
    for path in [
        "/envoy.service.auth.v3.Authorization/Report",
        "/envoy.service.auth.v2.Authorization/Check",
        "/nothing",
    ] {
        let answer = send(&mut client, call(path, &[]), vec![frame(b"")]).await;
        assert_eq!(answer.grpc_status, "12", "{path}: UNIMPLEMENTED");
    }
    // Health, through tonic's router on the same connection.
    let answer = send(
        &mut client,
        call("/grpc.health.v1.Health/Check", &[]),
        vec![frame(b"")],
    )
    .await;
    assert_eq!(answer.grpc_status, "0");
    assert_eq!(answer.body, frame(&[0x08, 0x01]), "SERVING");
}

/// Streams opened and reset at once (HTTP/2 "rapid reset"), two thousand times over, do not keep
/// the server from answering its other clients.
#[tokio::test]
async fn a_client_resetting_every_stream_it_opens_does_not_stall_others() {
    let server = serve(&[]).await;
    let mut abuser = connect(&server).await;
    let body = frame(&allowed_check());
    for _ in 0..2000 {
        let Ok((_, mut stream)) = abuser.send_request(call(CHECK, &[]), false) else {
            break;
        };
        let _ = stream.send_data(Bytes::copy_from_slice(&body[..10]), false);
        stream.send_reset(h2::Reason::CANCEL);
        if abuser.clone().ready().await.is_err() {
            break;
        }
    }
    let mut client = connect(&server).await;
    let answer = send(&mut client, call(CHECK, &[]), vec![body]).await;
    assert_eq!(denial(&check_response(&answer)), None);
}

/// A server whose request bodies may hold 256 KiB together, as may one message.
async fn serve_with_budget() -> Server {
    serve(&[
        "--max-buffered-bytes",
        "262144",
        "--max-message-bytes",
        "262144",
    ])
    .await
}

/// The start of a message that announces `announced` bytes: its prefix and `sent` zeros.
fn message_start(announced: usize, sent: usize) -> Vec<u8> {
    let mut start = vec![0];
    start.extend((announced as u32).to_be_bytes());
    start.resize(5 + sent, 0);
    start
}

/// Bodies arriving in pieces hold bytes the whole process shares (`--max-buffered-bytes`): a call
/// that would take more is a `503 overloaded` denial at once, while its body is still coming, and
/// what a call held comes back when it ends.
#[tokio::test]
async fn bodies_arriving_in_pieces_share_one_bounded_budget() {
    const KIB: usize = 1024;
    let server = serve_with_budget().await;
    let mut client = connect(&server).await;
    let first_part = message_start(200 * KIB, 150 * KIB);

    // A holds 150 KiB of a message announced at 200 KiB, and waits.
    let (a_response, mut a) = client.send_request(call(CHECK, &[]), false).expect("sends");
    a.send_data(Bytes::from(first_part.clone()), false)
        .expect("sends data");
    tokio::time::sleep(Duration::from_millis(300)).await;

    // B would hold 150 KiB more: past the 256 KiB, refused before its body ends.
    let (b_response, mut b) = client.send_request(call(CHECK, &[]), false).expect("sends");
    b.send_data(Bytes::from(first_part.clone()), false)
        .expect("sends data");
    let refused = tokio::time::timeout(Duration::from_secs(3), read(b_response))
        .await
        .expect("B is answered before its body ends");
    let (status, body) = denial(&check_response(&refused)).expect("B is denied");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("overloaded"), "{body}");

    // A ends: its 200 KiB of zeros are no CheckRequest, a decision all the same.
    a.send_data(Bytes::from(vec![0; 50 * KIB]), true)
        .expect("sends data");
    let (status, body) = denial(&check_response(&read(a_response).await)).expect("A is denied");
    assert_eq!(status, 400, "{body}");

    // A's bytes came back: C holds 150 KiB again, and is read to its end.
    let c = send(
        &mut client,
        call(CHECK, &[]),
        vec![first_part, vec![0; 50 * KIB]],
    )
    .await;
    let (status, body) = denial(&check_response(&c)).expect("C is denied");
    assert_eq!(
        status, 400,
        "C is read whole, not refused for want of room: {body}"
    );

    // D takes all but 100 bytes of the budget: a body in pieces needing more is refused...
    let (_held, mut d) = client.send_request(call(CHECK, &[]), false).expect("sends");
    d.send_data(
        Bytes::from(message_start(256 * KIB, 256 * KIB - 100)),
        false,
    )
    .expect("sends data");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (e_response, mut e) = client.send_request(call(CHECK, &[]), false).expect("sends");
    e.send_data(Bytes::from(message_start(1000, 500)), false)
        .expect("sends data");
    let (status, _) = denial(&check_response(&read(e_response).await)).expect("E is denied");
    assert_eq!(status, 503);
    // ...while Envoy's whole-message frames charge nothing and are decided.
    let answer = send(&mut client, call(CHECK, &[]), vec![frame(&allowed_check())]).await;
    assert_eq!(denial(&check_response(&answer)), None, "ALLOW");
}

/// An HTTP/2 connection whose driver's end can be awaited.
async fn connect_watched(server: &Server) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let port = server.url().rsplit(':').next().unwrap().to_owned();
    let tcp = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connects");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client.ready().await.expect("ready"), driver)
}

/// A connection with no call for `--idle-timeout` (between one and two of it) is told to go
/// away; one that keeps calling stays.
#[tokio::test]
async fn a_connection_without_calls_is_closed_after_the_idle_timeout() {
    let server = serve(&["--idle-timeout", "1s"]).await;
    let (mut idle, idle_driver) = connect_watched(&server).await;
    let (mut busy, busy_driver) = connect_watched(&server).await;
    let check = frame(&allowed_check());
    let answer = send(&mut idle, call(CHECK, &[]), vec![check.clone()]).await;
    assert_eq!(denial(&check_response(&answer)), None);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        let answer = send(&mut busy, call(CHECK, &[]), vec![check.clone()]).await;
        assert_eq!(
            denial(&check_response(&answer)),
            None,
            "the busy one still answers"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        idle_driver.is_finished(),
        "the idle connection is still open"
    );
    assert!(!busy_driver.is_finished(), "the busy connection was closed");
}

/// A connection that opens HTTP/2 and never calls is told to go away after `--handshake-timeout`,
/// not the much longer `--idle-timeout`: idle openings cannot hold every connection slot.
#[tokio::test]
async fn a_connection_that_never_calls_is_closed_after_the_handshake_timeout() {
    let server = serve(&["--idle-timeout", "1h", "--handshake-timeout", "1s"]).await;
    let (_silent, silent_driver) = connect_watched(&server).await;
    let (mut calling, calling_driver) = connect_watched(&server).await;
    let check = frame(&allowed_check());
    let answer = send(&mut calling, call(CHECK, &[]), vec![check]).await;
    assert_eq!(denial(&check_response(&answer)), None);
    let started = Instant::now();
    while !silent_driver.is_finished() && started.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        silent_driver.is_finished(),
        "the connection without a call is still open"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !calling_driver.is_finished(),
        "a connection that called keeps the idle timeout"
    );
}

/// A connection is told to go away at `--max-connection-age` however busy it is (so that a
/// proxy's long-lived connections spread over replicas added since, and a client certificate is
/// checked again), its calls answered to the last.
#[tokio::test]
async fn a_busy_connection_is_told_to_go_away_at_its_maximum_age() {
    let server = serve(&["--max-connection-age", "1s"]).await;
    let (mut busy, driver) = connect_watched(&server).await;
    let check = frame(&allowed_check());
    let started = Instant::now();
    let mut answered = 0;
    while !driver.is_finished() && started.elapsed() < Duration::from_secs(5) {
        let Ok(ready) = busy.clone().ready().await else {
            break;
        };
        busy = ready;
        let Ok((response, mut stream)) = busy.send_request(call(CHECK, &[]), false) else {
            break;
        };
        if stream.send_data(Bytes::from(check.clone()), true).is_err() {
            break;
        }
        if let Ok(Ok(answer)) = tokio::time::timeout(Duration::from_secs(2), response).await {
            assert_eq!(answer.status(), 200);
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        driver.is_finished(),
        "the connection is still open after 5 s"
    );
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(800),
        "closed after {lived:?}, before its age"
    );
    assert!(
        answered >= 5,
        "calls were answered while it lived: {answered}"
    );
}

/// The kernel's timer on the server's end of the connection from `client_port` to
/// `server_port`, from /proc/net/tcp: (which timer, clock ticks until it fires).
fn server_socket_timer(server_port: u16, client_port: u16) -> Option<(u32, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reads /proc/net/tcp (Linux)");
    let local = format!("0100007F:{server_port:04X}");
    let remote = format!("0100007F:{client_port:04X}");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (timer, when) = fields[5].split_once(':')?;
        Some((
            u32::from_str_radix(timer, 16).ok()?,
            u64::from_str_radix(when, 16).ok()?,
        ))
    })
}

/// A dead peer is found by TCP keep-alive (the kernel probes a connection silent for 30 s)
/// rather than by HTTP/2 pings: the server's end of an open, quiet connection has the kernel's
/// keep-alive timer running.
#[tokio::test]
async fn an_open_connection_is_watched_by_tcp_keep_alive() {
    let server = serve(&[]).await;
    let server_port: u16 = server.url().rsplit(':').next().unwrap().parse().unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", server_port))
        .await
        .expect("connects");
    let client_port = tcp.local_addr().unwrap().port();
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let answer = send(&mut client, call(CHECK, &[]), vec![frame(&allowed_check())]).await;
    assert_eq!(denial(&check_response(&answer)), None, "ALLOW");
    // Once everything sent is acknowledged, the only timer left is keep-alive's (2).
    let started = Instant::now();
    let timer = loop {
        let timer = server_socket_timer(server_port, client_port);
        if timer.is_some_and(|(kind, _)| kind == 2) || started.elapsed() > Duration::from_secs(5) {
            break timer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (kind, ticks) = timer.expect("the server's end of the connection is in /proc/net/tcp");
    assert_eq!(kind, 2, "the keep-alive timer runs on the server's socket");
    // Clock ticks are 1/100 s: the first probe is due within the 30 s of silence allowed.
    assert!(ticks <= 30 * 100, "first probe in {ticks} ticks, past 30 s");
    drop(client);
}

/// After SIGTERM, a connection still opening HTTP/2 and a stream that never ends (a health
/// `Watch`) hold the exit back only until `--request-timeout` and a second of grace have passed.
#[tokio::test]
async fn a_drain_ends_within_the_request_timeout_whatever_the_clients_hold() {
    let mut server = serve(&["--request-timeout", "1s", "--handshake-timeout", "30s"]).await;
    let port = server.url().rsplit(':').next().unwrap().to_owned();
    let mut opening = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connects");
    tokio::io::AsyncWriteExt::write_all(&mut opening, b"PRI * HTTP/2.0")
        .await
        .expect("sends");
    let (mut client, _driver) = connect_watched(&server).await;
    // grpc.health.v1.HealthCheckRequest { service: "" }: an empty message.
    let (watch, mut stream) = client
        .send_request(call("/grpc.health.v1.Health/Watch", &[]), false)
        .expect("sends");
    stream
        .send_data(Bytes::from(frame(&[])), false)
        .expect("sends data");
    let watch = watch.await.expect("the Watch answers");
    assert_eq!(watch.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    server.signal("TERM");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("stepgate still running 10 s after SIGTERM");
    let took = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5), "the drain took {took:?}");
    drop((opening, stream, watch));
}

/// `Decide` bodies charge the same budget while they arrive: past it the call is a
/// `503 overloaded` denial (as a `Check` is), and a whole message still goes through.
#[tokio::test]
async fn decide_bodies_arriving_in_pieces_are_charged_to_the_same_budget() {
    const DECIDE: &str = "/stepgate.v1.DecisionService/Decide";
    const KIB: usize = 1024;
    let server = serve_with_budget().await;
    let mut client = connect(&server).await;
    let first_part = message_start(200 * KIB, 150 * KIB);
    let (_a_response, mut a) = client
        .send_request(call(DECIDE, &[]), false)
        .expect("sends");
    a.send_data(Bytes::from(first_part.clone()), false)
        .expect("sends data");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (b_response, mut b) = client
        .send_request(call(DECIDE, &[]), false)
        .expect("sends");
    b.send_data(Bytes::from(first_part), false)
        .expect("sends data");
    let refused = tokio::time::timeout(Duration::from_secs(3), read(b_response))
        .await
        .expect("B is answered before its body ends");
    assert_eq!(refused.grpc_status, "0", "a denial, not a gRPC error");
    let refused = stepgate::api::v1::DecideResponse::decode(&refused.body[5..]).expect("an answer");
    assert_eq!(
        (refused.reason.as_str(), refused.http_status),
        ("overloaded", 503),
        "{refused:?}"
    );
    // An empty DecideRequest, whole: decided (a 400 denial in an OK answer).
    let whole = send(&mut client, call(DECIDE, &[]), vec![frame(&[])]).await;
    assert_eq!(whole.grpc_status, "0");
}

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// A reflection request asking for the list of services, its ignored `host` field `padding`
/// bytes long (to make messages of a chosen size).
fn list_services(padding: usize) -> Vec<u8> {
    let mut message = vec![0x0a];
    prost::encoding::encode_varint(padding as u64, &mut message);
    message.resize(message.len() + padding, b'h');
    message.extend([0x3a, 0x00]);
    message
}

/// The gRPC messages in a body.
fn messages_in(mut body: &[u8]) -> usize {
    let mut count = 0;
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        body = &body[5 + len..];
        count += 1;
    }
    count
}

/// With the budget held by a client's unfinished messages, a message arriving whole in one frame
/// is charged nothing and served: gRPC health (what kubelet and Envoy probe) and `Decide`.
#[tokio::test]
async fn a_budget_others_hold_refuses_no_call_whose_message_arrives_whole() {
    const KIB: usize = 1024;
    const DECIDE: &str = "/stepgate.v1.DecisionService/Decide";
    let server = serve_with_budget().await;
    let mut client = connect(&server).await;
    // All but 2 bytes of the budget, held by a Check that never ends.
    let (_held, mut d) = client.send_request(call(CHECK, &[]), false).expect("sends");
    d.send_data(Bytes::from(message_start(256 * KIB, 256 * KIB - 2)), false)
        .expect("sends data");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = {
        let (e_response, mut e) = client.send_request(call(CHECK, &[]), false).expect("sends");
        e.send_data(Bytes::from(message_start(1000, 500)), false)
            .expect("sends data");
        denial(&check_response(&read(e_response).await)).expect("denied")
    };
    assert_eq!(
        status, 503,
        "the budget is held: a body in pieces is refused"
    );

    let health = send(&mut client, call(HEALTH_CHECK, &[]), vec![frame(&[])]).await;
    assert_eq!(health.grpc_status, "0", "health answers");
    assert_eq!(health.body[5..], [0x08, 0x01], "SERVING");
    let decide = send(&mut client, call(DECIDE, &[]), vec![frame(&[])]).await;
    assert_eq!(decide.grpc_status, "0", "Decide answers");
}

/// A message's bytes are charged only until it is whole: a streaming call sending many whole
/// messages, more than the budget together, is served to its end, and what it sent does not stay
/// charged for as long as the stream lives.
#[tokio::test]
async fn whole_messages_of_a_stream_are_given_back_to_the_budget() {
    const KIB: usize = 1024;
    let server = serve_with_budget().await;
    let mut client = connect(&server).await;
    // Twenty messages of 15 KiB (a reflection request is at most 16), most in pieces of HTTP/2
    // frames: 300 KiB against 256 KiB.
    let message = frame(&list_services(15 * KIB));
    let answer = send(&mut client, call(REFLECTION, &[]), vec![message; 20]).await;
    assert_eq!(answer.grpc_status, "0", "served to its end");
    assert_eq!(messages_in(&answer.body), 20, "each request answered");
}

/// How a call ended: its `grpc-status`, or `None` when the stream was reset before one came.
async fn ending(response: h2::client::ResponseFuture) -> Option<String> {
    let response = response.await.ok()?;
    let in_headers = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut received = response.into_body();
    while let Some(data) = received.data().await {
        let data = data.ok()?;
        let _ = received.flow_control().release_capacity(data.len());
    }
    let trailers = received.trailers().await.ok()?;
    in_headers
        .or_else(|| trailers.and_then(|t| Some(t.get("grpc-status")?.to_str().ok()?.to_owned())))
}

/// A streaming call has no deadline, but a message of it still unfinished `--request-timeout`
/// after its first byte has its stream reset, and its charge given back.
#[tokio::test]
async fn a_stream_holding_an_unfinished_message_is_reset_after_the_request_timeout() {
    const KIB: usize = 1024;
    let server = serve(&[
        "--max-buffered-bytes",
        "24576",
        "--max-message-bytes",
        "24576",
        "--max-decide-message-bytes",
        "24576",
        "--request-timeout",
        "1s",
    ])
    .await;
    let mut client = connect(&server).await;
    let (response, mut stream) = client
        .send_request(call(REFLECTION, &[]), false)
        .expect("sends");
    stream
        .send_data(Bytes::from(message_start(16 * KIB, 15 * KIB)), false)
        .expect("sends data");
    let ended = tokio::time::timeout(Duration::from_secs(4), ending(response))
        .await
        .expect("the stream is ended while its client still holds it open");
    assert_ne!(
        ended.as_deref(),
        Some("0"),
        "not as if the client had ended it"
    );
    // Its charge came back: another 15 KiB in pieces (30 KiB with it, against 24) is read to
    // its end.
    let c = send(
        &mut client,
        call(CHECK, &[]),
        vec![message_start(20 * KIB, 15 * KIB), vec![0; 5 * KIB]],
    )
    .await;
    let (status, body) = denial(&check_response(&c)).expect("C is denied");
    assert_eq!(
        status, 400,
        "C is read whole, not refused for want of room: {body}"
    );
}

/// Each message of a stream has its own time, also when the frames do not end where messages do
/// (as a proxy re-frames a body): a stream of messages each whole at once is served however long
/// it lasts.
#[tokio::test]
async fn each_message_of_a_stream_has_its_own_time_whatever_the_framing() {
    let server = serve(&["--request-timeout", "1s", "--idle-timeout", "1h"]).await;
    let mut client = connect(&server).await;
    let one = frame(&list_services(4000));
    let all: Vec<u8> = std::iter::repeat_n(one.clone(), 10).flatten().collect();
    // Every frame but the first ends halfway through a message.
    let half = one.len() / 2;
    let mut chunks = vec![all[..half].to_vec()];
    chunks.extend(all[half..].chunks(one.len()).map(<[u8]>::to_vec));
    let (response, mut stream) = client
        .send_request(call(REFLECTION, &[]), false)
        .expect("sends");
    let reader = tokio::spawn(read(response));
    let count = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        // 11 frames over 2.75 s, each message whole 250 ms after its first byte.
        tokio::time::sleep(Duration::from_millis(250)).await;
        stream
            .send_data(Bytes::from(chunk), i + 1 == count)
            .expect("the stream is still open");
    }
    let answer = reader.await.expect("read");
    assert_eq!(answer.grpc_status, "0");
    assert_eq!(messages_in(&answer.body), 10, "every message answered");
}

/// A client that takes no answers stops the service reading its requests, and so the body: the
/// message it last sent in part is still given back `--request-timeout` after its first byte.
#[tokio::test]
async fn a_stream_whose_answers_are_not_taken_gives_its_charge_back_in_time() {
    const KIB: usize = 1024;
    let server = serve(&[
        "--max-buffered-bytes",
        "65536",
        "--max-message-bytes",
        "65536",
        "--request-timeout",
        "1s",
        "--idle-timeout",
        "1h",
    ])
    .await;
    let check_in_pieces = || vec![message_start(40 * KIB, 30 * KIB), vec![0; 10 * KIB]];
    let mut client = connect(&server).await;
    let before = send(&mut client, call(CHECK, &[]), check_in_pieces()).await;
    assert_eq!(denial(&check_response(&before)).map(|d| d.0), Some(400));

    // A client that never gives answers room, three reflection streams each holding 15 KiB of a
    // message after three whole ones: 45 KiB of the 64.
    let (mut stingy, _driver) = stingy_connection(&server).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let (response, mut stream) = stingy
            .send_request(call(REFLECTION, &[]), false)
            .expect("sends");
        let small = frame(&list_services(10));
        let mut chunk = [small.clone(), small.clone(), small].concat();
        chunk.extend(message_start(15 * KIB, 15 * KIB - 1 - chunk.len()));
        stream
            .send_data(Bytes::from(chunk), false)
            .expect("sends data");
        streams.push((response, stream));
        stingy = stingy.ready().await.expect("ready");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = denial(&check_response(
        &send(&mut client, call(CHECK, &[]), check_in_pieces()).await,
    ))
    .expect("denied");
    assert_eq!(status, 503, "the streams hold the budget meanwhile");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = send(&mut client, call(CHECK, &[]), check_in_pieces()).await;
    let (status, body) = denial(&check_response(&after)).expect("denied");
    assert_eq!(status, 400, "given back after the request timeout: {body}");
    drop(streams);
}

/// A connection whose client never gives its answers room (an HTTP/2 window of 0, never
/// updated): (its client, its driver).
async fn stingy_connection(server: &Server) -> (SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let port = server.url().rsplit(':').next().unwrap().to_owned();
    let tcp = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connects");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("HTTP/2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client.ready().await.expect("ready"), driver)
}

/// A [`stingy_connection`] with `calls` allowed `Check`s sent on it: (its driver, the answers'
/// bodies).
async fn connection_taking_no_answers(
    server: &Server,
    calls: usize,
) -> (tokio::task::JoinHandle<()>, Vec<h2::RecvStream>) {
    let (mut client, driver) = stingy_connection(server).await;
    let check = Bytes::from(frame(&allowed_check()));
    let mut answers = Vec::new();
    for _ in 0..calls {
        let (response, mut stream) = client.send_request(call(CHECK, &[]), false).expect("sends");
        stream.send_data(check.clone(), true).expect("sends data");
        answers.push(response);
        client = client.ready().await.expect("ready");
    }
    // The heads come (HEADERS are not flow-controlled); the answers cannot.
    let mut bodies = Vec::new();
    for response in answers {
        let response = response.await.expect("an answer's head");
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    (driver, bodies)
}

/// Waits until `driver`'s connection is closed, checking all the while that a well-behaved
/// client on `fine` is answered.
async fn closed_while_others_are_answered(
    driver: &tokio::task::JoinHandle<()>,
    fine: &mut SendRequest<Bytes>,
    within: Duration,
) {
    let check = frame(&allowed_check());
    let started = Instant::now();
    while !driver.is_finished() {
        assert!(
            started.elapsed() < within,
            "the connection that takes no answers is still open"
        );
        let answer = send(fine, call(CHECK, &[]), vec![check.clone()]).await;
        assert_eq!(
            denial(&check_response(&answer)),
            None,
            "others are answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each of the connection's answers was dropped unread.
async fn never_delivered(bodies: Vec<h2::RecvStream>) {
    for mut body in bodies {
        assert!(
            !matches!(body.data().await, Some(Ok(_))),
            "an answer arrived through a window of 0"
        );
    }
}

/// A client that never gives its answers room would have each of its streams hold its answer
/// for as long as the connection lives. A unary call's stream is reset a second past its
/// deadline, and the connection told to go away; other clients, and a health `Watch` stream
/// (which is open by design), are untouched.
#[tokio::test]
async fn a_client_that_does_not_take_its_answers_loses_its_streams_and_its_connection() {
    let server = serve_metered(&["--request-timeout", "1s"]).await;
    const STUCK: usize = 40;
    let (stuck, bodies) = connection_taking_no_answers(&server, STUCK).await;

    // A health Watch on a well-behaved connection stays open past every deadline.
    let (mut fine, fine_driver) = connect_watched(&server).await;
    let (watch, mut watch_stream) = fine
        .send_request(call("/grpc.health.v1.Health/Watch", &[]), false)
        .expect("sends");
    watch_stream
        .send_data(Bytes::from(frame(&[])), true)
        .expect("sends the request");
    let watch = watch.await.expect("the Watch's head");
    let head = format!("{:?}", watch.headers());
    let mut watch = watch.into_body();
    let first = watch
        .data()
        .await
        .unwrap_or_else(|| panic!("a first status: {head}"))
        .expect("data");
    let _ = watch.flow_control().release_capacity(first.len());

    closed_while_others_are_answered(&stuck, &mut fine, Duration::from_secs(10)).await;
    never_delivered(bodies).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), watch.data())
            .await
            .is_err(),
        "the Watch stream ended"
    );
    assert!(
        !fine_driver.is_finished(),
        "the well-behaved connection closed"
    );
    let metrics = server.scrape().await;
    let series = format!("stepgate_grpc_unread_answers_total {STUCK}");
    assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
    assert!(
        server
            .wait_for_text(
                Duration::from_secs(5),
                &["a client did not take a call's answer by its deadline"]
            )
            .await,
        "no warning"
    );
}

/// A streaming call's answers are held to the same bound as a unary call's: a client that
/// never gives them room loses its reflection streams `--request-timeout` after their first
/// answer was ready, and its connection. tonic-reflection writes the request's `host` into its
/// answers twice and holds them for the client, so a request is at most 16 KiB, and a health
/// request (a service name) at most 1 KiB: one announcing more is refused at once, before its
/// length is reserved.
#[tokio::test]
async fn a_streaming_call_whose_answers_are_not_taken_is_dropped_and_large_requests_refused() {
    const KIB: usize = 1024;
    let server = serve_metered(&["--request-timeout", "1s"]).await;
    let (mut stingy, driver) = stingy_connection(&server).await;
    const STREAMS: usize = 5;
    let mut heads = Vec::new();
    for _ in 0..STREAMS {
        let (response, mut stream) = stingy
            .send_request(call(REFLECTION, &[]), false)
            .expect("sends");
        let request = frame(&list_services(10));
        stream
            .send_data(Bytes::from([request.clone(), request].concat()), false)
            .expect("sends data");
        heads.push((response, stream));
        stingy = stingy.ready().await.expect("ready");
    }
    let mut fine = connect(&server).await;
    closed_while_others_are_answered(&driver, &mut fine, Duration::from_secs(10)).await;
    let metrics = server.scrape().await;
    let series = format!("stepgate_grpc_unread_answers_total {STREAMS}");
    assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
    drop(heads);

    // Announced past the bound: refused at once, the rest of the message never sent.
    for (path, announced) in [(REFLECTION, 16 * KIB + 1), (HEALTH_CHECK, KIB + 1)] {
        let (response, mut stream) = fine.send_request(call(path, &[]), false).expect("sends");
        stream
            .send_data(Bytes::from(message_start(announced, 0)), false)
            .expect("sends the prefix");
        let ended = tokio::time::timeout(Duration::from_secs(3), ending(response))
            .await
            .unwrap_or_else(|_| panic!("{path}: held for a message announcing {announced} bytes"));
        // Health ends the call OUT_OF_RANGE (tonic's answer to a message past its limit);
        // tonic-reflection ends its stream.
        let expected = if path == HEALTH_CHECK { "11" } else { "0" };
        assert_eq!(ended.as_deref(), Some(expected), "{path}");
    }
    // Within the bounds, both answer.
    let health = send(&mut fine, call(HEALTH_CHECK, &[]), vec![frame(&[])]).await;
    assert_eq!(health.grpc_status, "0");
    let listed = send(
        &mut fine,
        call(REFLECTION, &[]),
        vec![frame(&list_services(15 * KIB))],
    )
    .await;
    assert_eq!(listed.grpc_status, "0");
}

/// The server advertises 100 calls in flight per connection (`--max-concurrent-streams`): HTTP/2
/// keeps what a connection's busiest moment needed until it closes, so the limit bounds what a
/// client keeping to it can make stepgate hold (docs/limits.md).
#[tokio::test]
async fn the_server_advertises_100_concurrent_streams() {
    let server = serve(&[]).await;
    let port = server.url().rsplit(':').next().unwrap().to_owned();
    let tcp = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connects");
    let (client, mut connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let mut client = client.ready().await.expect("ready");
    // The server's SETTINGS come before its first answer.
    let answer = tokio::select! {
        answer = send(&mut client, call(CHECK, &[]), vec![frame(&allowed_check())]) => answer,
        ended = &mut connection => panic!("the connection ended: {ended:?}"),
    };
    assert_eq!(denial(&check_response(&answer)), None);
    assert_eq!(connection.max_concurrent_send_streams(), 100);
}

/// A client with a gRPC library's default windows (64 KiB) sending a burst of calls on one
/// connection: most answers wait a moment for a window update, and every one is delivered. (With
/// room for 250 calls: 100, the default, hold fewer answers than the window.)
#[tokio::test]
async fn a_burst_of_calls_through_default_windows_is_answered_whole() {
    let server = serve_metered(&["--max-concurrent-streams", "256"]).await;
    let mut client = connect(&server).await;
    let check = Bytes::from(frame(&allowed_check()));
    // h2's client sends as many streams as it likes until the server's SETTINGS arrive, and the
    // server refuses those past its limit (REFUSED_STREAM): a first answer brings the SETTINGS,
    // and the client then waits for room (docs/decide.md).
    let first = send(&mut client, call(CHECK, &[]), vec![check.to_vec()]).await;
    assert_eq!(denial(&check_response(&first)), None);
    let mut answers = tokio::task::JoinSet::new();
    // More than a 64 KiB window holds (an answer is about 300 bytes), and few enough that h2's
    // own client does not take the answers split at the window's edge for a flood of small
    // DATA frames.
    for _ in 0..250 {
        client = client.ready().await.expect("ready");
        let (response, mut stream) = client.send_request(call(CHECK, &[]), false).expect("sends");
        stream.send_data(check.clone(), true).expect("sends data");
        answers.spawn(read(response));
    }
    let mut allowed = 0;
    while let Some(answer) = answers.join_next().await {
        let answer = answer.expect("a reader");
        assert_eq!(denial(&check_response(&answer)), None);
        allowed += 1;
    }
    assert_eq!(allowed, 250);
    let metrics = server.scrape().await;
    let series = "stepgate_grpc_unread_answers_total 0";
    assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
}

/// An HTTP/2 frame: its 9-byte header (stream 0) and payload.
fn raw_frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
    out.extend_from_slice(payload);
    out
}

/// Opens a raw connection and sends the client preface and `settings` SETTINGS frames, each
/// changing the initial window size; then a PING. Whether the PING was answered before the
/// server closed the connection.
async fn ping_after_settings(server: &Server, settings: usize) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let port = server.url().rsplit(':').next().unwrap().to_owned();
    let mut tcp = TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .expect("connects");
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    for i in 0..settings {
        // SETTINGS_INITIAL_WINDOW_SIZE (4), alternately 65 535 and 65 536.
        let mut payload = vec![0, 4];
        payload.extend((65_535 + (i as u32 % 2)).to_be_bytes());
        bytes.extend(raw_frame(4, 0, &payload));
    }
    bytes.extend(raw_frame(6, 0, b"pingpong"));
    tcp.write_all(&bytes).await.expect("writes");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
        // A PING acknowledgement (type 6, flag ACK) carrying our payload.
        if received
            .windows(9 + 8)
            .any(|w| w[3] == 6 && w[4] == 1 && &w[9..] == b"pingpong")
        {
            return true;
        }
    }
    false
}

/// Each SETTINGS frame that changes the initial window size makes the server walk every open
/// stream; a client sending more than a client does (100 on a connection) loses the connection.
#[tokio::test]
async fn a_client_flooding_settings_frames_loses_its_connection() {
    let server = Server::start_with_metrics(&demo_policy_path()).await;
    assert!(
        ping_after_settings(&server, 100).await,
        "100 SETTINGS frames are a client's right"
    );
    assert!(
        !ping_after_settings(&server, 101).await,
        "the connection of a client sending 101 SETTINGS frames is still served"
    );
    let metrics = server.scrape().await;
    let series = "stepgate_grpc_settings_floods_total 1";
    assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
    // Others are served.
    let mut client = connect(&server).await;
    let answer = send(&mut client, call(CHECK, &[]), vec![frame(&allowed_check())]).await;
    assert_eq!(denial(&check_response(&answer)), None);
}

/// A `Decide` message prost cannot decode — a string field that is not UTF-8, a `Struct` nested
/// past prost's depth limit — is answered as every request stepgate cannot decide on: an OK
/// gRPC status and a DENY `400 malformed_request` naming what did not decode, not `INTERNAL`.
/// The next call on the connection is decided as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decide_message_that_does_not_decode_is_a_400_denial() {
    use stepgate::api::v1::{DecideRequest, DecideResponse};
    const DECIDE: &str = "/stepgate.v1.DecisionService/Decide";
    let server = serve(&[]).await;
    let mut client = connect(&server).await;
    // `attributes` (field 5), a Struct whose one field holds a Struct, and so on, 120 deep.
    let mut nested: Vec<u8> = Vec::new();
    for _ in 0..120 {
        // Value { struct_value (5): Struct { fields (1): entry { key (1): "a", value (2): … } } }
        let mut entry = vec![0x0a, 0x01, b'a', 0x12];
        entry.extend(varint(nested.len()));
        entry.extend(&nested);
        let mut fields = vec![0x0a];
        fields.extend(varint(entry.len()));
        fields.extend(entry);
        let mut value = vec![0x2a];
        value.extend(varint(fields.len()));
        value.extend(fields);
        nested = value;
    }
    // The attributes Struct { fields: { "a": <the nested Value> } }.
    let mut entry = vec![0x0a, 0x01, b'a', 0x12];
    entry.extend(varint(nested.len()));
    entry.extend(&nested);
    let mut attributes = vec![0x0a];
    attributes.extend(varint(entry.len()));
    attributes.extend(entry);
    let mut deep = vec![0x1a, 0x01, b'x', 0x2a];
    deep.extend(varint(attributes.len()));
    deep.extend(&attributes);
    let undecodable: [(&str, Vec<u8>); 3] = [
        // field 3 (operation), one byte 0xff
        ("operation not UTF-8", vec![0x1a, 0x01, 0xff]),
        // field 4 (http) { field 3 (path): 0xc3 0x28 }
        (
            "http.path not UTF-8",
            vec![0x22, 0x04, 0x1a, 0x02, 0xc3, 0x28],
        ),
        ("attributes nested past the depth limit", deep),
    ];
    for (what, message) in undecodable {
        let answer = send(&mut client, call(DECIDE, &[]), vec![frame(&message)]).await;
        assert_eq!(answer.grpc_status, "0", "{what}: an OK gRPC status");
        let response = DecideResponse::decode(&answer.body[5..]).expect("a DecideResponse");
        assert_eq!(
            (
                response.outcome(),
                response.reason.as_str(),
                response.http_status
            ),
            (stepgate::api::v1::Outcome::Deny, "malformed_request", 400),
            "{what}: {response:?}"
        );
        assert!(
            response.message.starts_with("the request does not decode"),
            "{what}: {}",
            response.message
        );
    }
    // A client sending the marker the codec leaves, with its own text after it, gets a fixed
    // message: nothing of what it wrote is echoed into the answer or the log.
    for forged in [
        "\0undecodable".to_owned(),
        format!("\0undecodable: FORGED\n{}", "A".repeat(10_000)),
    ] {
        let message = DecideRequest {
            operation: forged,
            ..Default::default()
        };
        let answer = send(
            &mut client,
            call(DECIDE, &[]),
            vec![frame(&message.encode_to_vec())],
        )
        .await;
        let response = DecideResponse::decode(&answer.body[5..]).expect("a DecideResponse");
        assert_eq!(response.reason, "malformed_request", "{response:?}");
        assert!(
            !response.message.contains("FORGED") && response.message.len() < 200,
            "{}",
            response.message
        );
    }
    let fine = DecideRequest {
        operation: "reports.read".into(),
        ..Default::default()
    };
    let answer = send(
        &mut client,
        call(DECIDE, &[]),
        vec![frame(&fine.encode_to_vec())],
    )
    .await;
    let response = DecideResponse::decode(&answer.body[5..]).expect("a DecideResponse");
    assert_eq!(response.reason, "token_missing", "{response:?}");
}

/// A `Decide` body is read as `Check`'s is: two messages (a reader taking the last would decide
/// another request), none, or one cut short are a `400 malformed_request` denial with an OK
/// gRPC status, not a decision on the first message or an `INTERNAL` error.
#[tokio::test]
async fn a_decide_with_two_messages_none_or_one_cut_short_is_a_400_denial() {
    use stepgate::api::v1::{DecideRequest, DecideResponse, HttpRequest};
    const DECIDE: &str = "/stepgate.v1.DecisionService/Decide";
    let server = serve(&[]).await;
    let mut client = connect(&server).await;
    let health = frame(
        &DecideRequest {
            http: Some(HttpRequest {
                method: "GET".into(),
                path: "/healthz".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let wire = frame(
        &DecideRequest {
            operation: "payments.wire_transfer".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let decided = |answer: &Answer| {
        assert_eq!(answer.grpc_status, "0", "an OK gRPC status");
        DecideResponse::decode(&answer.body[5..]).expect("a DecideResponse")
    };
    let alone = decided(&send(&mut client, call(DECIDE, &[]), vec![health.clone()]).await);
    assert_eq!(alone.reason, "anonymous_allowed", "{alone:?}");
    for (case, chunks) in [
        ("two messages", vec![health.clone(), wire.clone()]),
        (
            "two messages in one frame",
            vec![[health.clone(), wire].concat()],
        ),
        ("no message", vec![]),
        ("a cut message", vec![health[..health.len() - 1].to_vec()]),
    ] {
        let response = decided(&send(&mut client, call(DECIDE, &[]), chunks).await);
        assert_eq!(
            (response.reason.as_str(), response.http_status),
            ("malformed_request", 400),
            "{case}: {response:?}"
        );
    }
    // The connection is still good.
    let again = decided(&send(&mut client, call(DECIDE, &[]), vec![health]).await);
    assert_eq!(again.reason, "anonymous_allowed");
}

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}
