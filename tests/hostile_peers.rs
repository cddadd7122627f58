//! The real binary against clients that try to take it down rather than get a decision: a log
//! pipe nobody reads, a thousand idle and half-sent connections to the metrics port with the
//! process short of file descriptors, a client holding every gRPC connection slot or more than
//! its source address's share, and requests past the size and header limits. Each test checks
//! that `Check` keeps answering (every call bounded by a deadline: a hang is a failure) and that
//! the attack costs what it should.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use common::{Server, Spawn, demo_policy_path, envoy_check, mint};
use envoy_types::{
    ext_authz::v3::pb::CheckRequest,
    pb::envoy::service::auth::v3::authorization_client::AuthorizationClient,
};
use stepgate::demo::TokenSpec;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// Longest one call may take before the test calls it a hang.
const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// One `Check`, bounded by [`CALL_DEADLINE`]: the HTTP status of the decision, or why none came.
async fn check(channel: &Channel, request: CheckRequest) -> Result<u32, String> {
    let mut client = AuthorizationClient::new(channel.clone());
    match tokio::time::timeout(CALL_DEADLINE, client.check(request)).await {
        Err(_) => Err(format!("no answer within {CALL_DEADLINE:?}")),
        Ok(Err(status)) => Err(format!("gRPC error {status}")),
        Ok(Ok(response)) => Ok(match response.into_inner().http_response {
            Some(envoy_types::ext_authz::v3::pb::HttpResponse::DeniedResponse(denied)) => {
                denied.status.map_or(403, |s| s.code as u32)
            }
            _ => 200,
        }),
    }
}

/// An allowed request of the demo policy (a fresh RS256 token, so verifying it is real work).
fn allowed_check(token: &str) -> CheckRequest {
    envoy_check(
        "GET",
        "api.example.com",
        "/accounts/42",
        &[("authorization", &format!("Bearer {token}"))],
    )
}

/// `GET /metrics` on `port`, bounded by [`CALL_DEADLINE`].
fn scrape(port: u16) -> Result<String, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(CALL_DEADLINE))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// The value of a metric line `name{…} value` (the first whose name starts with `name`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// CPU time (user + system) the process has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').expect("a stat line").1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: `sysconf` has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stderr_nobody_reads_never_stalls_decisions_or_health() {
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            metrics: true,
            stop_reading_stderr: true,
            // Every decision logged (ALLOW lines are at debug by default).
            args: vec!["--log-level".into(), "info,stepgate::decision=debug".into()],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let channel = server.channel().await;
    let token = mint(&TokenSpec::default());
    // Each decision logs a line of about 300 bytes: 20 000 of them are several times what the
    // pipe (64 KiB) and stepgate's buffer (1 MiB) hold.
    let mut calls = JoinSet::new();
    let mut failures = Vec::new();
    for i in 0..20_000 {
        if calls.len() >= 64
            && let Some(done) = calls.join_next().await
            && let Err(why) = done.expect("a call task")
        {
            failures.push(why);
        }
        if failures.len() >= 10 {
            // Stalled: waiting out every call's deadline would take half an hour.
            calls.abort_all();
            break;
        }
        let channel = channel.clone();
        let request = allowed_check(&token);
        calls.spawn(async move {
            match check(&channel, request).await {
                Ok(200) => Ok(()),
                Ok(status) => Err(format!("call {i}: status {status}")),
                Err(why) => Err(format!("call {i}: {why}")),
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        match done {
            Ok(Err(why)) => failures.push(why),
            Ok(Ok(())) => {}
            Err(aborted) if aborted.is_cancelled() => {}
            Err(panicked) => panic!("a call task: {panicked}"),
        }
    }
    assert!(
        failures.is_empty(),
        "{} Checks failed with stderr blocked (stopped counting at 10), e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(
        check(&channel, allowed_check(&token)).await,
        Ok(200),
        "Check still answers"
    );
    server.wait_ready().await;
    let metrics = tokio::task::spawn_blocking({
        let port = server.metrics_port.expect("a metrics port");
        move || scrape(port)
    })
    .await
    .unwrap()
    .expect("metrics answer");
    let dropped = metric(&metrics, "stepgate_log_lines_dropped_total").unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "the pipe never filled (no line dropped), so the test proved nothing:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_idle_or_half_sent_metrics_connections_cost_no_cpu_and_leave_check_answering() {
    // Short of file descriptors, as a process under attack is: accept then fails with EMFILE.
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            metrics: true,
            max_open_files: Some(64),
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let channel = server.channel().await;
    let token = mint(&TokenSpec::default());
    assert_eq!(check(&channel, allowed_check(&token)).await, Ok(200));
    let port = server.metrics_port.expect("a metrics port");

    // A thousand connections at once, every other one with half a request head that never ends.
    // The server accepts those it has a slot and a descriptor for; the listen backlog holds
    // more, and the rest wait in the attacker's own SYN retries.
    let mut connecting = JoinSet::new();
    for i in 0..1000 {
        connecting.spawn(async move {
            let mut stream = tokio::time::timeout(
                CALL_DEADLINE,
                tokio::net::TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            .ok()?
            .ok()?;
            if i % 2 == 0 {
                use tokio::io::AsyncWriteExt as _;
                let _ = stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .await;
            }
            Some((i, stream))
        });
    }
    let mut held = Vec::new();
    while let Some(done) = connecting.join_next().await {
        held.extend(done.expect("a connect task"));
    }
    assert!(held.len() >= 100, "only {} connections opened", held.len());
    // Every call keeps answering while they are held.
    for _ in 0..50 {
        assert_eq!(check(&channel, allowed_check(&token)).await, Ok(200));
    }
    // Idle: no busy loop on failing accepts. A spinning loop burns about 2 s of CPU here.
    let pid = server.pid();
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_time(pid) - before;
    assert!(
        spent < Duration::from_millis(500),
        "stepgate used {spent:?} of CPU in 2 s with only idle connections open"
    );
    // Slow clients are cut off after the header timeout (5 s), freeing their slots: the first
    // half-sent connection the server accepted is closed by it.
    held.sort_by_key(|(i, _)| *i);
    let (_, first) = held
        .iter_mut()
        .find(|(i, _)| i % 2 == 0)
        .expect("a half-sent connection");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        use tokio::io::AsyncReadExt as _;
        first.read(&mut byte).await
    })
    .await;
    assert!(
        matches!(read, Ok(Ok(0)))
            || matches!(&read, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a half-sent request was not closed by the server: {read:?}"
    );
    drop(held);
    // Once the attackers are gone, metrics answer again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let result = tokio::task::spawn_blocking(move || scrape(port))
            .await
            .unwrap();
        match result {
            Ok(text) if text.contains("stepgate_decisions_total") => break text,
            other => assert!(
                Instant::now() < deadline,
                "metrics did not answer after the connections closed: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(check(&channel, allowed_check(&token)).await, Ok(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_holding_every_connection_slot_delays_new_clients_until_it_lets_go() {
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: vec!["--max-connections".into(), "2".into()],
            ..Spawn::default()
        },
    );
    // Readiness needs a connection of its own: wait before the slots are taken.
    server.wait_ready().await;
    let token = mint(&TokenSpec::default());
    let hogs: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connecting"))
        .collect();
    // Both slots are held by connections that never speak: a new client waits in the backlog.
    let waiting = tokio::spawn({
        let url = server.url();
        let request = allowed_check(&token);
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect_lazy();
            let mut client = AuthorizationClient::new(channel);
            client.check(request).await.map(|_| Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "a third connection was served");
    let released = Instant::now();
    drop(hogs);
    let answered = tokio::time::timeout(CALL_DEADLINE, waiting)
        .await
        .expect("served once a slot was free")
        .unwrap()
        .expect("an answer");
    assert!(answered >= released);
}

/// A TCP connection to the server from `source` (any of 127.0.0.0/8 reaches loopback).
fn connect_from(source: [u8; 4], port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from((source, 0)).into())
        .expect("binding a loopback source address");
    socket
        .connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .expect("connecting");
    socket.into()
}

/// Whether the server speaks HTTP/2 on `stream` (its SETTINGS frame answers the client's
/// preface) or closes it without a byte.
fn served(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(CALL_DEADLINE)).unwrap();
    // The client preface and an empty SETTINGS frame.
    let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0");
    let mut header = [0u8; 9];
    match stream.read_exact(&mut header) {
        Ok(()) => {
            assert_eq!(header[3], 4, "the server's first frame is SETTINGS");
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("neither served nor closed within {CALL_DEADLINE:?}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_source_address_cannot_hold_more_than_its_share_of_connections() {
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: ["--max-connections-per-source", "3"]
                .map(str::to_owned)
                .to_vec(),
            metrics: true,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let hog = [127, 0, 0, 3];
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect_from(hog, server.port)).collect();
    assert!(served(&mut held[0]), "a connection within the share");
    // A fourth from the same address is closed at once...
    assert!(
        !served(&mut connect_from(hog, server.port)),
        "a fourth was served"
    );
    // ...while another address is served as before.
    let channel = server.channel().await;
    let token = mint(&TokenSpec::default());
    assert_eq!(check(&channel, allowed_check(&token)).await, Ok(200));
    assert!(served(&mut connect_from([127, 0, 0, 4], server.port)));
    let text = server.scrape().await;
    assert!(
        metric(&text, "stepgate_grpc_connections_refused").is_some_and(|n| n >= 1.0),
        "the refusal is counted:\n{text}"
    );
    assert!(
        server
            .wait_for_text(
                CALL_DEADLINE,
                &["holds --max-connections-per-source already"]
            )
            .await,
        "the refusal is logged:\n{}",
        server.logs_text()
    );
    // Once one of its connections closes, the address gets a connection again.
    drop(held.pop());
    let started = Instant::now();
    while !served(&mut connect_from(hog, server.port)) {
        assert!(
            started.elapsed() < CALL_DEADLINE,
            "the closed connection's share never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_never_open_http2_lose_their_slot_after_the_handshake_timeout() {
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: ["--max-connections", "2", "--handshake-timeout", "1s"]
                .map(str::to_owned)
                .to_vec(),
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let token = mint(&TokenSpec::default());
    let mut hogs: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).expect("connecting"))
        .collect();
    // One sends nothing; the other the start of the HTTP/2 preface, and nothing more.
    hogs[1].write_all(b"PRI * HTTP/2.0").expect("sends");
    // Without giving anything back, the idle connections are closed and a real client served.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect_lazy();
    assert_eq!(check(&channel, allowed_check(&token)).await, Ok(200));
    for hog in &mut hogs {
        // The server's HTTP/2 preface, then the end of the connection.
        hog.set_read_timeout(Some(CALL_DEADLINE)).unwrap();
        let mut received = Vec::new();
        let end = hog.read_to_end(&mut received);
        assert!(
            end.is_ok() || end.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "an idle connection was left open"
        );
    }
}

#[tokio::test]
async fn requests_past_the_size_and_header_limits_are_413_and_431_denials() {
    let server = Server::spawn_with(
        &demo_policy_path(),
        Spawn {
            args: vec!["--max-message-bytes".into(), "65536".into()],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let channel = server.channel().await;
    let big = "x".repeat(70_000);
    let oversized = envoy_check("GET", "api.example.com", "/accounts", &[("x-big", &big)]);
    assert_eq!(check(&channel, oversized).await, Ok(413));

    // 200 headers: more than the default limit of 128 (`limits.max_header_count`).
    let names: Vec<String> = (0..200).map(|i| format!("x-extra-{i}")).collect();
    let headers: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    let many = envoy_check("GET", "api.example.com", "/accounts", &headers);
    assert_eq!(check(&channel, many).await, Ok(431));
    // 100 KiB of header values: more than `limits.max_header_bytes` (96 KiB), within the frame.
    let server_large = Server::spawn(&demo_policy_path());
    server_large.wait_ready().await;
    let channel = server_large.channel().await;
    let value = "v".repeat(25_000);
    let large: Vec<(String, &str)> = (0..4)
        .map(|i| (format!("x-large-{i}"), value.as_str()))
        .collect();
    let large: Vec<(&str, &str)> = large.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let request = envoy_check("GET", "api.example.com", "/accounts", &large);
    assert_eq!(check(&channel, request).await, Ok(431));
    // Still deciding afterwards.
    let token = mint(&TokenSpec::default());
    assert_eq!(check(&channel, allowed_check(&token)).await, Ok(200));
}

/// One address holding idle connections to the metrics port holds at most 8 of its 64 slots: a
/// scrape from another address is answered while they are held.
#[tokio::test(flavor = "multi_thread")]
async fn one_address_cannot_hold_every_metrics_slot() {
    let server = Server::start_with_metrics(&demo_policy_path()).await;
    let port = server.metrics_port.expect("a metrics port");
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connects"),
        );
    }
    // Those past the address's share are closed at once; the others stay open, idle, until the
    // 5 s the server gives a request head (all read at once, each for 2 s).
    let mut reads = tokio::task::JoinSet::new();
    for mut stream in held.drain(..) {
        reads.spawn(async move {
            use tokio::io::AsyncReadExt as _;
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await;
            (matches!(read, Ok(Ok(0) | Err(_))), stream)
        });
    }
    let mut closed = 0;
    while let Some(read) = reads.join_next().await {
        let (was_closed, stream) = read.expect("a read");
        closed += usize::from(was_closed);
        held.push(stream);
    }
    assert_eq!(
        closed,
        100 - 8,
        "connections of the address closed on accept"
    );
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut scrape = socket
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .expect("connects from 127.0.0.2");
    let text = tokio::time::timeout(CALL_DEADLINE, async {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        scrape.read_to_string(&mut text).await.unwrap();
        text
    })
    .await
    .expect("the scrape from another address was not answered while one address held slots");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    drop(held);
}
