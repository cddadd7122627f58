//! Two stepgate replicas sharing one real `redis-server`, with the real Envoy in front of replica
//! B: a block or a revocation set through replica A's admin API is enforced by B; a risk signal
//! counted on both reaches its threshold in the shared total and escalates on both, then expires;
//! Redis killed and restarted: no decision fails, and blocks made meanwhile converge; with
//! `on_store_failure: fail_closed` requests are refused while it is down.
//!
//! The propagation delay (block set on A → enforced by B) is measured and printed, not asserted:
//! run `cargo nextest run --test redis --no-capture` to see it.

mod common;
#[path = "common/envoy.rs"]
mod envoy;
#[path = "common/redis.rs"]
mod redis_server;

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use stepgate::risk::{blocks::MAX_TTL_SECONDS, revocations::MAX_CLOCK_AHEAD_SECONDS};

use common::{
    ADMIN_ROLE, Server, Spawn, TempPolicy, admin_ok, bin, demo_policy_without_risk, mint,
    operator_token,
};
use redis_server::{Redis, resp, stored_block, stored_revocation};
use stepgate::{
    api::v1::{
        BlockKind, BlockRequest, BlockTarget, DecideRequest, DecideResponse, Outcome,
        admin_service_client::AdminServiceClient, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};
use tonic::transport::Endpoint;

/// The demo policy sharing its risk state through `redis`, with `extra` under `risk:`.
fn policy(name: &str, redis: &Redis, extra: &str) -> TempPolicy {
    let text = demo_policy_without_risk()
        + &format!("\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"] }}\n")
        + &format!("risk:\n  store: {}\n{extra}", redis.url());
    TempPolicy::new(name, &text)
}

/// A replica on `policy` with an admin listener and metrics: (server, admin URL).
async fn replica(policy: &TempPolicy) -> (Server, String) {
    common::serve_with_admin(&policy.path, true).await
}

/// Two replicas on `policy`, once each has read the store: (A, A's admin URL, B, B's).
async fn two_replicas(policy: &TempPolicy) -> (Server, String, Server, String) {
    let (a, a_admin) = replica(policy).await;
    let (b, b_admin) = replica(policy).await;
    for server in [&a, &b] {
        store_up(server, true, Duration::from_secs(10)).await;
    }
    (a, a_admin, b, b_admin)
}

/// Blocks `subject` through the admin API at `admin`.
fn block_subject(admin: &str, subject: &str, reason_id: &str, ttl: &str) -> serde_json::Value {
    admin_ok(
        admin,
        &[
            "block",
            "--subject",
            subject,
            "--reason-id",
            reason_id,
            "--ttl",
            ttl,
        ],
    )
}

fn entra_token(subject: &str, acrs: &[&str], cp1: bool) -> String {
    mint(&TokenSpec {
        subject: subject.into(),
        acrs: acrs.iter().map(|s| s.to_string()).collect(),
        xms_cc: if cp1 { vec!["cp1".into()] } else { Vec::new() },
        ..TokenSpec::default()
    })
}

async fn decide(server: &Server, token: &str, operation: &str) -> DecideResponse {
    DecisionServiceClient::new(server.channel().await)
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.to_owned())),
            operation: operation.into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner()
}

/// Polls `probe` every 20 ms until it holds; fails after `within`.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !probe().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `server` reports the store as `up` (1) or down (0); fails with its log.
async fn store_up(server: &Server, up: bool, within: Duration) {
    let want = if up { "1" } else { "0" };
    let deadline = Instant::now() + within;
    while metric(server, "stepgate_risk_store_up").await.as_deref() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "stepgate_risk_store_up never {want} within {within:?}:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(server: &Server, name: &str) -> Option<String> {
    let port = server.metrics_port.expect("spawned with metrics");
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_revocations_and_signals_are_shared_by_two_replicas_behind_envoy() {
    let redis = Redis::start();
    let signals = r#"  signals:
    repeated_step_ups:
      count: step_up
      key: subject
      window: 2s
      threshold: 4
      action: step_up
      require: { auth_contexts: [c3] }
"#;
    let policy = policy("redis-shared", &redis, signals);
    let (a, a_admin, b, b_admin) = two_replicas(&policy).await;
    let echo = envoy::Echo::start().await;
    let proxy = envoy::Envoy::start(envoy::ENVOY_YAML, b.port, echo.port).await;
    let http = reqwest::Client::new();
    let get = |token: String| {
        let request = http.get(proxy.url("/reports")).bearer_auth(token);
        async move {
            let response = request.send().await.expect("a response from Envoy");
            let www = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            (response.status().as_u16(), www)
        }
    };

    // A block set on A: B's answers through Envoy turn to 403; unblocked on A, back to 200.
    let alice = entra_token("alice", &[], true);
    assert_eq!(get(alice.clone()).await.0, 200);
    block_subject(&a_admin, "alice", "INC-1", "10m");
    eventually("B enforces A's block", Duration::from_secs(10), || async {
        get(alice.clone()).await.0 == 403
    })
    .await;
    admin_ok(&a_admin, &["unblock", "--subject", "alice"]);
    eventually("B lifts A's block", Duration::from_secs(10), || async {
        get(alice.clone()).await.0 == 200
    })
    .await;

    // Propagation, measured: blocks set through A's admin API, each timed until B's `Decide`
    // refuses that subject.
    let channel = Endpoint::from_shared(a_admin.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", operator_token()).parse().unwrap();
    let mut admin_client =
        AdminServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let mut b_client = DecisionServiceClient::new(b.channel().await);
    let mut delays = Vec::new();
    for i in 0..60 {
        let subject = format!("user-{i}");
        let token = entra_token(&subject, &[], true);
        admin_client
            .block(BlockRequest {
                target: Some(BlockTarget {
                    kind: BlockKind::Subject as i32,
                    value: subject.clone(),
                }),
                reason_id: format!("P-{i}"),
                reason: String::new(),
                ttl_seconds: 600,
            })
            .await
            .expect("A blocks");
        let set = Instant::now();
        loop {
            let answer = b_client
                .decide(DecideRequest {
                    credential: Some(Credential::Token(token.clone())),
                    operation: "reports.read".into(),
                    ..Default::default()
                })
                .await
                .expect("B decides")
                .into_inner();
            if answer.reason == "blocked" {
                break;
            }
            assert!(
                set.elapsed() < Duration::from_secs(10),
                "block {i} never reached B"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        delays.push(set.elapsed());
    }
    delays.sort();
    let at = |q: f64| delays[((delays.len() as f64 * q).ceil() as usize).min(delays.len()) - 1];
    eprintln!(
        "propagation A → B over Redis, {} blocks: p50 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        at(0.5),
        at(0.99),
        delays[delays.len() - 1]
    );

    // A revocation on A: on B a cp1 Entra token gets the continuous-access claims challenge
    // (nbf at the revocation time), another gets 401 invalid_token.
    let before = common::unix_now();
    let dave_cp1 = mint(&TokenSpec {
        subject: "dave".into(),
        xms_cc: vec!["cp1".into()],
        extra: [("iat".to_owned(), (before - 60).into())]
            .into_iter()
            .collect(),
        ..TokenSpec::default()
    });
    let dave_plain = mint(&TokenSpec {
        subject: "dave".into(),
        extra: [("iat".to_owned(), (before - 60).into())]
            .into_iter()
            .collect(),
        ..TokenSpec::default()
    });
    admin_ok(
        &a_admin,
        &[
            "revoke",
            "--subject",
            "dave",
            "--before",
            &before.to_string(),
            "--reason-id",
            "PWRESET-3",
        ],
    );
    eventually(
        "B applies A's revocation",
        Duration::from_secs(10),
        || async { decide(&b, &dave_plain, "reports.read").await.reason == "session_revoked" },
    )
    .await;
    let plain = decide(&b, &dave_plain, "reports.read").await;
    assert_eq!((plain.outcome(), plain.http_status), (Outcome::Deny, 401));
    assert!(
        plain.www_authenticate.contains("invalid_token"),
        "{plain:?}"
    );
    let (status, www) = get(dave_plain.clone()).await;
    assert_eq!(status, 401);
    assert!(
        www.unwrap_or_default().contains("error=\"invalid_token\""),
        "a client without cp1 gets invalid_token"
    );
    let (status, www) = get(dave_cp1.clone()).await;
    let www = www.unwrap_or_default();
    assert_eq!(status, 401);
    assert!(www.contains("error=\"insufficient_claims\""), "{www}");
    let cp1 = decide(&b, &dave_cp1, "reports.read").await;
    let claims = cp1.step_up.expect("a claims challenge").claims;
    let expected =
        format!("{{\"access_token\":{{\"nbf\":{{\"essential\":true,\"value\":\"{before}\"}}}}}}");
    assert_eq!(claims, expected);

    // A risk signal counted on both: two step-ups on A, two on B make four in Redis, and both
    // replicas then ask mallory for c3 as well.
    let without = entra_token("mallory", &[], true);
    for server in [&a, &a, &b, &b] {
        assert_eq!(
            decide(server, &without, "payments.wire_transfer")
                .await
                .outcome(),
            Outcome::StepUp
        );
    }
    let with_mfa = entra_token("mallory", &["c1"], true);
    for server in [&b, &a] {
        eventually(
            "the shared count escalates mallory",
            Duration::from_secs(5),
            || async {
                let answer = decide(server, &with_mfa, "payments.wire_transfer").await;
                answer
                    .step_up
                    .is_some_and(|s| s.missing_auth_contexts == ["c3"])
            },
        )
        .await;
    }
    // Through Envoy too: B asks for c3 with the Entra claims challenge.
    let (status, www) = get(with_mfa.clone()).await;
    assert_eq!(status, 401);
    let www = www.unwrap_or_default();
    assert!(www.contains("insufficient_claims"), "{www}");
    // … until the window has slid past those step-ups (asked through the admin API, which
    // counts nothing).
    for admin_url in [&a_admin, &b_admin] {
        eventually(
            "the escalation expires",
            Duration::from_secs(15),
            || async {
                let counts = admin_ok(admin_url, &["counts", "--subject", "mallory"]);
                counts["counts"][0]["reached"] == false
            },
        )
        .await;
    }
    for server in [&a, &b] {
        assert_eq!(
            decide(server, &with_mfa, "payments.wire_transfer")
                .await
                .outcome(),
            Outcome::Allow
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_no_decision_and_blocks_converge_after_it() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-outage", &redis, "");
    let (a, a_admin, b, _) = two_replicas(&policy).await;
    block_subject(&a_admin, "grace", "BEFORE", "1h");
    let grace = entra_token("grace", &[], true);
    eventually("B has the first block", Duration::from_secs(10), || async {
        decide(&b, &grace, "reports.read").await.reason == "blocked"
    })
    .await;

    // Decisions on both replicas all through the outage, counted.
    let stop = Arc::new(AtomicBool::new(false));
    let (decided, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for server in [&a, &b] {
        let channel = server.channel().await;
        let (stop, decided, failed) = (stop.clone(), decided.clone(), failed.clone());
        let token = entra_token("henry", &[], true);
        load.push(tokio::spawn(async move {
            let mut client = DecisionServiceClient::new(channel);
            while !stop.load(Ordering::Relaxed) {
                let answer = client
                    .decide(DecideRequest {
                        credential: Some(Credential::Token(token.clone())),
                        operation: "reports.read".into(),
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(a) if a.get_ref().outcome() == Outcome::Allow => {
                        decided.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    redis.kill();
    for server in [&a, &b] {
        store_up(server, false, Duration::from_secs(10)).await;
        server.wait_ready().await;
    }
    // A block made on A while Redis is down: enforced by A at once, by B once Redis is back.
    block_subject(&a_admin, "ivan", "DURING", "1h");
    let ivan = entra_token("ivan", &[], true);
    assert_eq!(decide(&a, &ivan, "reports.read").await.reason, "blocked");
    assert_eq!(decide(&b, &ivan, "reports.read").await.reason, "allowed");
    assert_eq!(decide(&b, &grace, "reports.read").await.reason, "blocked");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Back, empty (no persistence): both blocks converge on both replicas and into Redis.
    let redis = Redis::start_on(port);
    eventually(
        "B gets the block made during the outage",
        Duration::from_secs(30),
        || async { decide(&b, &ivan, "reports.read").await.reason == "blocked" },
    )
    .await;
    for server in [&a, &b] {
        store_up(server, true, Duration::from_secs(30)).await;
        assert_eq!(
            decide(server, &grace, "reports.read").await.reason,
            "blocked"
        );
    }
    let fields = redis
        .command("HKEYS stepgate:blocks\r\n")
        .unwrap_or_default();
    assert!(
        fields.contains("subject|grace") && fields.contains("subject|ivan"),
        "{fields}"
    );
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let (decided, failed) = (
        decided.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    assert!(decided > 100, "{decided} decisions");
    assert_eq!(
        failed,
        0,
        "{failed} of {} decisions failed",
        decided + failed
    );
    assert!(
        a.logs_text().contains("lost the Redis risk store")
            && a.logs_text().contains("connected to the Redis risk store"),
        "{}",
        a.logs_text()
    );
}

/// A replica that starts while Redis is unreachable knows none of the shared blocks and
/// revocations: it stays NOT_SERVING, so the Service keeps routing to the replicas that know
/// them, until it has read them; then it serves and enforces them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_down_is_not_ready_until_it_has_read_the_blocks() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-cold-start", &redis, "");
    let (a, a_admin) = replica(&policy).await;
    store_up(&a, true, Duration::from_secs(10)).await;
    block_subject(&a_admin, "judy", "COLD", "1h");
    redis.kill();
    store_up(&a, false, Duration::from_secs(10)).await;

    let b = Server::spawn_with(
        &policy.path,
        Spawn {
            metrics: true,
            ..Spawn::default()
        },
    );
    // Its keys load at once (a local file); the store does not answer.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            b.serving().await,
            Ok(false),
            "a replica that never read the blocks reports SERVING:\n{}",
            b.logs_text()
        );
    }
    // A replica that had read them stays SERVING through the outage.
    assert_eq!(a.serving().await, Ok(true));

    // Redis is back (empty): A writes its block back, B reads it and turns SERVING.
    let _redis = Redis::start_on(port);
    b.wait_ready().await;
    let judy = entra_token("judy", &[], true);
    eventually("B enforces the block", Duration::from_secs(30), || async {
        decide(&b, &judy, "reports.read").await.reason == "blocked"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_requests_while_the_store_is_down() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy(
        "redis-fail-closed",
        &redis,
        "  on_store_failure: fail_closed\n",
    );
    let (server, _) = replica(&policy).await;
    let alice = entra_token("alice", &[], true);
    eventually("connected", Duration::from_secs(10), || async {
        decide(&server, &alice, "reports.read").await.outcome() == Outcome::Allow
    })
    .await;
    redis.kill();
    eventually("refusing while down", Duration::from_secs(10), || async {
        let answer = decide(&server, &alice, "reports.read").await;
        answer.reason == "risk_store_unavailable" && answer.http_status == 503
    })
    .await;
    // Health stays SERVING: the outage is the store's, not this replica's.
    server.wait_ready().await;
    let _redis = Redis::start_on(port);
    eventually("serving again", Duration::from_secs(30), || async {
        decide(&server, &alice, "reports.read").await.outcome() == Outcome::Allow
    })
    .await;
}

/// `--risk-store` (or `STEPGATE_RISK_STORE`, as a Helm chart sets it from a Secret) names the
/// store over the policy; a URL the Redis client cannot use is refused at start (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_can_come_from_the_environment_instead_of_the_policy() {
    let redis = Redis::start();
    let policy = TempPolicy::new("redis-env", &demo_policy_without_risk());
    let server = Server::spawn_with(
        &policy.path,
        Spawn {
            metrics: true,
            env: vec![("STEPGATE_RISK_STORE".into(), redis.url())],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    store_up(&server, true, Duration::from_secs(10)).await;
    assert!(!server.logs_text().contains("risk.store changed"));

    let out = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&policy.path)
        .args(["--risk-store", "redis://:secret@[::1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a usable Redis URL"), "{stderr}");
    assert!(
        !stderr.contains("secret"),
        "the password is not echoed: {stderr}"
    );
}

/// What no replica writes, put straight into Redis by another of its clients — a reason past
/// the admin API's bound, a reason id it refuses, a megabyte of record, a field or value that is
/// not UTF-8, the revocations' key holding a string — is ignored and costs a replica nothing
/// (it stays connected); the well-formed block beside them is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_no_replica_writes_are_ignored_and_the_others_applied() {
    let redis = Redis::start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let record = |reason_id: &str, reason: &str| {
        format!(
            "{}|{}",
            now * 1000,
            serde_json::json!({
                "reason_id": reason_id, "reason": reason, "created_at": now,
                "expires_at": now + 3600, "created_by": "san:elsewhere",
            })
        )
    };
    let megabyte = "x".repeat(1 << 20);
    for (subject, stored) in [
        ("valid", record("INC-7", "a well-formed block")),
        ("long-reason", record("INC-7", &"r".repeat(2000))),
        ("bad-id", record("not an id!", "a reason")),
        ("huge", record("INC-7", &megabyte)),
    ] {
        let field = format!("subject|{subject}");
        let reply = redis
            .command(&resp(&["HSET", "stepgate:blocks", &field, &stored]))
            .unwrap_or_default();
        assert_eq!(reply, ":1\r\n", "HSET {field}");
    }
    // And a few hundred entries that do not read as records at all, nor name a kind of block.
    for n in 0..300 {
        let (field, stored) = if n % 2 == 0 {
            (
                format!("subject|garbage-{n}"),
                format!("{}|not json", now * 1000),
            )
        } else {
            (format!("planet|{n}"), record("INC-7", "a reason"))
        };
        redis.command(&resp(&["HSET", "stepgate:blocks", &field, &stored]));
    }
    // Bytes that are not UTF-8, in Redis's inline syntax (`\xff` in double quotes).
    for command in [
        format!(
            "HSET stepgate:blocks \"subject|bob\\xff\" \"{}|{{}}\"\r\n",
            now * 1000
        ),
        format!(
            "HSET stepgate:blocks \"subject|carol\" \"{}|\\xff\"\r\n",
            now * 1000
        ),
        "SET stepgate:revocations not-a-hash\r\n".to_owned(),
    ] {
        let reply = redis.command(&command).unwrap_or_default();
        assert!(
            reply.starts_with(":1") || reply.starts_with("+OK"),
            "{command}: {reply}"
        );
    }
    let policy = policy("redis-hostile", &redis, "");
    let (server, _) = replica(&policy).await;
    store_up(&server, true, Duration::from_secs(10)).await;
    let valid = entra_token("valid", &[], true);
    eventually(
        "the well-formed block applies",
        Duration::from_secs(10),
        || async { decide(&server, &valid, "reports.read").await.reason == "blocked" },
    )
    .await;
    assert_eq!(
        metric(&server, "stepgate_risk_store_up").await.as_deref(),
        Some("1"),
        "the store was read despite what it holds:\n{}",
        server.logs_text()
    );
    assert_eq!(
        metric(&server, "stepgate_risk_store_errors_total")
            .await
            .as_deref(),
        Some("0"),
        "a session failed on what the store holds:\n{}",
        server.logs_text()
    );
    for subject in ["long-reason", "bad-id", "huge"] {
        let token = entra_token(subject, &[], true);
        assert_eq!(
            decide(&server, &token, "reports.read").await.outcome(),
            Outcome::Allow,
            "{subject}'s entry was applied"
        );
    }
    assert!(
        server
            .wait_for_text(
                Duration::from_secs(5),
                &["ignored what the Redis risk store holds"]
            )
            .await,
        "nothing said:\n{}",
        server.logs_text()
    );
    // Said at most once every 10 s, not once for each entry.
    let said = server
        .logs_text()
        .lines()
        .filter(|l| l.contains("\"WARN\"") && (l.contains("Redis") || l.contains("risk store")))
        .count();
    assert!(said <= 3, "{said} lines:\n{}", server.logs_text());
}

/// Risk signals' source blocks beyond what a replica keeps (768) do not pile up in Redis: the
/// ones a replica evicts to make room are dropped from the store as lifts, so a resync does not
/// apply (and evict) them again every 30 seconds, and the other replicas drop them too. But an
/// eviction never lifts an operator's block: one that a signal's longer block replaced (in the
/// store, before this replica started: it knows only the signal's) is back once that signal's
/// block is evicted, in the store and here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risk_source_blocks_a_replica_evicts_are_dropped_from_the_store() {
    let redis = Redis::start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    const STORED: u64 = 900;
    for i in 0..STORED {
        let field = format!("source|10.{}.{}.0/24", i / 256, i % 256);
        let stored = format!(
            "{}|{}",
            now * 1000,
            serde_json::json!({
                "reason_id": "risk.forged_tokens", "reason": "a signal's block",
                "created_at": now, "expires_at": now + 600 + i, "created_by": "risk:forged_tokens",
            })
        );
        let reply = redis
            .command(&resp(&["HSET", "stepgate:blocks", &field, &stored]))
            .unwrap_or_default();
        assert_eq!(reply, ":1\r\n", "HSET {field}");
    }
    // An operator's five minutes on 192.0.2.0/24, then a signal's block lengthening it to ten
    // minutes and a second: among the first to be evicted.
    let net = "source|192.0.2.0/24";
    let record = |by: &str, reason_id: &str, ends: u64| {
        serde_json::json!({
            "removed": false, "reason_id": reason_id, "reason": "", "created_at": now,
            "expires_at": ends, "created_by": by,
        })
        .to_string()
    };
    let (now_i, at) = (now as i64, now * 1000);
    let operators = record("san:ops", "INC-1", now + 300);
    let stamp = (at - 2000).to_string();
    let reply = put_script(
        &redis,
        net,
        &stamp,
        &operators,
        "operator",
        (now + 300) as i64,
        now_i,
    );
    assert_eq!(reply, ":1\r\n");
    let signals = record("risk:forged_tokens", "risk.forged_tokens", now + 601);
    let stamp = (at - 1000).to_string();
    let reply = put_script(
        &redis,
        net,
        &stamp,
        &signals,
        "signal",
        (now + 601) as i64,
        now_i,
    );
    assert_eq!(reply, ":1\r\n");
    let policy = policy("redis-risk-evictions", &redis, "");
    let (server, _) = replica(&policy).await;
    store_up(&server, true, Duration::from_secs(10)).await;
    // Counted in Redis: the values together are more than one reply read takes.
    let live = || {
        let script = "local n = 0 for _, v in ipairs(redis.call('HVALS', KEYS[1])) do \
                      if string.find(v, '\"removed\":true', 1, true) then n = n + 1 end end \
                      return n";
        let reply = redis
            .command(&resp(&["EVAL", script, "1", "stepgate:blocks"]))
            .unwrap_or_default();
        reply
            .trim()
            .trim_start_matches(':')
            .parse::<usize>()
            .unwrap_or_else(|_| panic!("EVAL answered {reply:?}"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // The stored ones and the signal's block over the operator's, less the 768 kept: evicted,
    // all lifted but the one that brings the operator's block back.
    while live() as u64 != STORED + 1 - 768 - 1 {
        assert!(
            Instant::now() < deadline,
            "{} lifts in Redis, {:?} blocks held:\n{}",
            live(),
            metric(&server, "stepgate_blocks").await,
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, stored) = stored_block(&redis, net).expect("the operator's block");
    assert_eq!(
        (&stored["created_by"], &stored["expires_at"]),
        (&"san:ops".into(), &(now + 300).into()),
        "{stored}"
    );
    // The blocks that end last are the ones kept, and the operator's is back here too.
    eventually(
        &format!("the operator's block back here\n{}", server.logs_text()),
        Duration::from_secs(10),
        || async { metric(&server, "stepgate_blocks").await.as_deref() == Some("769") },
    )
    .await;
}

fn seed_block(redis: &Redis, field: &str, at_ms: i64, record: serde_json::Value) {
    let reply = redis
        .command(&resp(&[
            "HSET",
            "stepgate:blocks",
            field,
            &format!("{at_ms}|{record}"),
        ]))
        .unwrap_or_default();
    assert_eq!(reply, ":1\r\n", "HSET {field}");
}

/// Waits until Redis holds `field`: a write queued after the ones a test looks at, so that
/// those have been sent (one replica's writes reach Redis in order).
async fn written(redis: &Redis, field: &str, server: &Server) {
    eventually(
        &format!("{field} written to Redis\n{}", server.logs_text()),
        Duration::from_secs(10),
        || async { stored_block(redis, field).is_some() },
    )
    .await;
}

/// A risk signal's block never shortens a block in force, across replicas as it never does
/// within one. A replica that has not yet read an operator's hour-long block (written by another
/// replica, its message lost, the next resync 30 s away) does not cut it to the signal's minute;
/// and an operator's block whose write is older than a signal's (it waited in a queue while Redis
/// was down) still replaces the signal's shorter block. Among operators the newest write wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signals_block_never_shortens_an_operators_across_replicas() {
    let redis = Redis::start();
    let signals = r#"  signals:
    repeated_step_ups:
      count: step_up
      key: subject
      window: 1m
      threshold: 2
      action: block
      block_for: 1m
"#;
    let policy = policy("redis-block-precedence", &redis, signals);
    let (server, admin) = replica(&policy).await;
    store_up(&server, true, Duration::from_secs(10)).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let record = |created_by: &str, expires_at: i64| {
        serde_json::json!({
            "reason_id": "INC-7", "reason": "", "created_at": now,
            "expires_at": expires_at, "created_by": created_by,
        })
    };

    // An operator's hour, written straight into Redis: neither published nor read here yet.
    seed_block(
        &redis,
        "subject|mallory",
        (now - 1) * 1000,
        record("san:ops", now + 3600),
    );
    // Mallory and Trudy step up twice: the signal blocks each for a minute here, and writes it.
    for subject in ["mallory", "trudy"] {
        let token = entra_token(subject, &[], true);
        for _ in 0..2 {
            let answer = decide(&server, &token, "payments.wire_transfer").await;
            assert_eq!(answer.outcome(), Outcome::StepUp, "{subject}: {answer:?}");
        }
        let answer = decide(&server, &token, "reports.read").await;
        assert_eq!(
            answer.reason, "blocked",
            "{subject}: the signal's block here"
        );
    }
    written(&redis, "subject|trudy", &server).await;
    let (_, trudy) = stored_block(&redis, "subject|trudy").unwrap();
    assert_eq!(trudy["created_by"], "risk:repeated_step_ups", "{trudy}");
    let (_, mallory) = stored_block(&redis, "subject|mallory").unwrap();
    assert_eq!(
        (&mallory["created_by"], &mallory["expires_at"]),
        (&"san:ops".into(), &(now + 3600).into()),
        "the operator's hour was cut to the signal's minute: {mallory}"
    );

    // A signal's minute stamped three minutes ahead (a write newer than any the replica makes
    // now, from a replica whose clock is ahead, within the five minutes a clock may be), over
    // Oscar and, as a control, an operator's minute over Olga.
    let ahead = (now + 180) * 1000;
    seed_block(
        &redis,
        "subject|oscar",
        ahead,
        record("risk:repeated_step_ups", now + 60),
    );
    seed_block(&redis, "subject|olga", ahead, record("san:ops", now + 60));
    for subject in ["oscar", "olga", "pat"] {
        block_subject(&admin, subject, "INC-8", "1h");
    }
    written(&redis, "subject|pat", &server).await;
    let (at, oscar) = stored_block(&redis, "subject|oscar").unwrap();
    assert!(
        oscar["expires_at"].as_i64().unwrap() >= now + 3600,
        "the operator's older hour did not replace the signal's newer minute: {oscar}"
    );
    assert!(at < ahead, "stored at the operator's own time: {at}");
    let writes = redis
        .command(&resp(&["HGET", "stepgate:blocks:writes", "subject|oscar"]))
        .unwrap_or_default();
    assert!(
        writes.contains(&ahead.to_string()) && writes.contains("risk:repeated_step_ups"),
        "the signal's newer minute is kept among the field's writes, refused: {writes}"
    );
    let (_, olga) = stored_block(&redis, "subject|olga").unwrap();
    assert_eq!(
        olga["expires_at"],
        now + 60,
        "among operators the newest write wins: {olga}"
    );
}

/// One write as a replica sends it to the write script (`PUT`), with its bounds: its reply.
fn put_script(
    redis: &Redis,
    field: &str,
    stamp_ms: &str,
    record: &str,
    what: &str,
    ends: i64,
    now: i64,
) -> String {
    put_script_to(
        redis,
        "stepgate:blocks",
        field,
        stamp_ms,
        record,
        what,
        ends,
        now,
    )
}

/// [`put_script`] into the hash `key`.
#[allow(clippy::too_many_arguments)]
fn put_script_to(
    redis: &Redis,
    key: &str,
    field: &str,
    stamp_ms: &str,
    record: &str,
    what: &str,
    ends: i64,
    now: i64,
) -> String {
    redis
        .command(&resp(&[
            "EVAL",
            stepgate::risk::redis::PUT,
            "2",
            key,
            &format!("{key}:writes"),
            field,
            stamp_ms,
            record,
            "{}",
            "stepgate:test",
            what,
            &ends.to_string(),
            &now.to_string(),
            "risk:",
            &MAX_TTL_SECONDS.to_string(),
            &MAX_CLOCK_AHEAD_SECONDS.to_string(),
            &stepgate::risk::redis::MAX_RECORD_BYTES.to_string(),
            &stepgate::risk::blocks::MAX_REASON_BYTES.to_string(),
            &stepgate::risk::blocks::MAX_CREATED_BY_BYTES.to_string(),
        ]))
        .unwrap_or_default()
}

/// One write as a replica sends it to the write script, made `ago` seconds before `now` and
/// lasting `lasts` (`what`: `operator`, `signal` or `lift`): its reply.
fn put_made(redis: &Redis, now: i64, field: &str, what: &str, ago: i64, lasts: i64) -> String {
    let record = serde_json::json!({
        "removed": what == "lift", "reason_id": "INC-5", "reason": "",
        "created_at": now - ago, "expires_at": now - ago + lasts,
        "created_by": if what == "signal" { "risk:repeated_step_ups" } else { "san:ops" },
    })
    .to_string();
    let ends = if what == "lift" { 0 } else { now - ago + lasts };
    let stamp = ((now - ago) * 1000).to_string();
    put_script(redis, field, &stamp, &record, what, ends, now)
}

/// The write script itself, against a real redis-server: a held-up operator's block replaces a
/// signal's shorter one only when no operator wrote or lifted since it, so that a lift, or a
/// newer operator's block, is not undone by an older write that waited out an outage.
#[test]
fn an_operators_held_up_block_never_undoes_a_later_lift_or_block() {
    let redis = Redis::start();
    let now = common::unix_now();
    let ms = |seconds_ago: i64| ((now - seconds_ago) * 1000).to_string();
    let put = |field: &str, what: &str, ago: i64, lasts: i64| {
        put_made(&redis, now, field, what, ago, lasts)
    };
    let held = |field: &str| stored_block(&redis, field).map(|(_, r)| r["created_by"].clone());

    // An operator lifts (60 s ago), then a signal blocks for a minute (30 s ago); the operator's
    // hour set 120 s ago, held up meanwhile, arrives last: the lift stands, under the signal's.
    assert_eq!(put("subject|lena", "lift", 60, 3600), ":1\r\n");
    assert_eq!(put("subject|lena", "signal", 30, 60), ":1\r\n");
    assert_eq!(put("subject|lena", "operator", 120, 3600), ":0\r\n");
    assert_eq!(held("subject|lena"), Some("risk:repeated_step_ups".into()));

    // An operator's minute (60 s ago), then a signal's two (30 s ago): the older hour arriving
    // last does not beat the newer operator's minute.
    assert_eq!(put("subject|omar", "operator", 60, 90), ":1\r\n");
    assert_eq!(put("subject|omar", "signal", 30, 120), ":1\r\n");
    assert_eq!(put("subject|omar", "operator", 120, 3600), ":0\r\n");
    assert_eq!(held("subject|omar"), Some("risk:repeated_step_ups".into()));

    // With no operator's write under the signal's, the held-up hour replaces it (the signal's
    // minute, newer, is refused over it: it never shortens a block), at its own time; a still
    // older operator's write is then refused.
    assert_eq!(put("subject|ines", "signal", 30, 60), ":1\r\n");
    assert_eq!(put("subject|ines", "operator", 120, 3600), ":1\r\n");
    let (at, record) = stored_block(&redis, "subject|ines").unwrap();
    assert_eq!(
        (at.to_string(), &record["created_by"]),
        (ms(120), &"san:ops".into())
    );
    assert_eq!(put("subject|ines", "operator", 150, 7200), ":0\r\n");
    // And a signal never shortens it, however new.
    assert_eq!(put("subject|ines", "signal", 0, 60), ":0\r\n");
    assert_eq!(held("subject|ines"), Some("san:ops".into()));

    // An operator's hour set 100 s ago and a lift 80 s ago, both held up while a signal blocked
    // for a minute (30 s ago, over an older operator's block since over). The lift is the
    // operators' last word, and the signal's minute, newer than both, the last write: in either
    // order of arrival the signal's minute is what is left, and the hour does not come back.
    for (field, first, second, last) in [
        ("subject|rita", ("operator", 100), ("lift", 80), "signal"),
        ("subject|ravi", ("lift", 80), ("operator", 100), "signal"),
    ] {
        assert_eq!(put(field, "operator", 200, 10), ":1\r\n");
        assert_eq!(put(field, "signal", 30, 60), ":1\r\n", "{field}");
        for (what, ago) in [first, second] {
            put(field, what, ago, 3600);
        }
        let (_, record) = stored_block(&redis, field).unwrap();
        let kept = if record["removed"] == true {
            "lift"
        } else if record["created_by"] == "san:ops" {
            "operator"
        } else {
            "signal"
        };
        assert_eq!(kept, last, "{field}: {record}");
    }
}

/// A block written into the store by hand, which every replica ignores (it ends ten years after
/// its creation, was made ahead of the clock, has no creation time, or is stamped an hour
/// ahead), does not stand in the way of a signal's or an operator's write either: before, the
/// script held it in force and refused the signal's block, which then stayed on the one
/// replica that counted it.
#[test]
fn a_stored_block_no_replica_writes_stands_in_no_writes_way() {
    let redis = Redis::start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let put = |field: &str, what: &str| -> String {
        let record = serde_json::json!({
            "removed": false, "reason_id": "INC-6", "reason": "",
            "created_at": now, "expires_at": now + 3600,
            "created_by": if what == "signal" { "risk:repeated_step_ups" } else { "san:ops" },
        })
        .to_string();
        put_script(
            &redis,
            field,
            &(now * 1000).to_string(),
            &record,
            what,
            now + 3600,
            now,
        )
    };
    let ten_years = 10 * 365 * 86_400;
    let by_hand = |created_at: Option<i64>, expires_at: i64| {
        let mut record = serde_json::json!({
            "reason_id": "INC-9", "reason": "", "expires_at": expires_at, "created_by": "ops",
        });
        if let Some(created_at) = created_at {
            record["created_at"] = created_at.into();
        }
        record
    };
    for (field, stamp, record) in [
        (
            "subject|far",
            now - 1,
            by_hand(Some(now - 10), now + ten_years),
        ),
        (
            "subject|early",
            now - 1,
            by_hand(Some(now + 3600), now + 7200),
        ),
        ("subject|undated", now - 1, by_hand(None, now + 7200)),
        (
            "subject|stamped",
            now + 3600,
            by_hand(Some(now - 10), now + 7200),
        ),
    ] {
        for what in ["signal", "operator"] {
            let field = &format!("{field}-{what}");
            seed_block(&redis, field, stamp * 1000, record.clone());
            assert_eq!(put(field, what), ":1\r\n", "{field} {what}");
            let (_, stored) = stored_block(&redis, field).unwrap();
            assert_eq!(stored["reason_id"], "INC-6", "{field} {what}: {stored}");
        }
    }
    // Nor one no replica reads: a creation time that is no whole number, a reason id or an
    // author the admin API refuses, a record longer than a replica reads.
    let huge = "r".repeat(9000);
    for (n, body) in [
        format!(
            r#"{{"reason_id":"INC-9","created_at":nan,"expires_at":{},"created_by":"ops"}}"#,
            now + 7200
        ),
        format!(
            r#"{{"reason_id":"INC-9","created_at":{}.5,"expires_at":{},"created_by":"ops"}}"#,
            now - 10,
            now + 7200
        ),
        format!(
            r#"{{"reason_id":"INC-9","created_at":0x10,"expires_at":{},"created_by":"ops"}}"#,
            now + 7200
        ),
        format!(
            r#"{{"created_at":{},"expires_at":{},"created_by":"ops"}}"#,
            now - 10,
            now + 7200
        ),
        format!(
            r#"{{"reason_id":"INC-9","created_at":{},"expires_at":{},"created_by":5}}"#,
            now - 10,
            now + 7200
        ),
        format!(
            r#"{{"reason_id":"not an id!","created_at":{},"expires_at":{}}}"#,
            now - 10,
            now + 7200
        ),
        format!(
            r#"{{"reason_id":"INC-9","reason":"{huge}","created_at":{},"expires_at":{}}}"#,
            now - 10,
            now + 7200
        ),
        "not json".to_owned(),
    ]
    .into_iter()
    .enumerate()
    {
        let field = format!("subject|unread-{n}");
        let reply = redis
            .command(&resp(&[
                "HSET",
                "stepgate:blocks",
                &field,
                &format!("{}|{body}", (now - 1) * 1000),
            ]))
            .unwrap_or_default();
        assert_eq!(reply, ":1\r\n", "HSET {field}");
        assert_eq!(put(&field, "signal"), ":1\r\n", "{field}: {body:.80}");
    }
    // A block a replica wrote, an hour long, still stands against a signal's shorter one.
    seed_block(
        &redis,
        "subject|kept",
        now * 1000,
        by_hand(Some(now), now + 7200),
    );
    assert_eq!(put("subject|kept", "signal"), ":0\r\n");
}

/// A replica whose connection drops after it has connected and read the store reconnects at
/// once, every time: the backoff starts over after each such session. Before, it kept doubling
/// over the life of the process (0.1, 0.2, … 10 s), and under `on_store_failure: fail_closed`
/// each later blip refused every request for that long. The lost and connected lines are said
/// at most every 10 s however often it happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_back_at_once_however_often() {
    let redis = Redis::start();
    let policy = policy("redis-blips", &redis, "");
    let (server, _admin) = replica(&policy).await;
    let errors = |server| async move {
        metric(server, "stepgate_risk_store_errors_total")
            .await
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    for round in 0..8 {
        store_up(&server, true, Duration::from_secs(20)).await;
        let before = errors(&server).await;
        let dropped = Instant::now();
        for kind in ["normal", "pubsub"] {
            redis.command(&resp(&["CLIENT", "KILL", "TYPE", kind]));
        }
        loop {
            let back = errors(&server).await > before
                && metric(&server, "stepgate_risk_store_up").await.as_deref() == Some("1");
            if back {
                break;
            }
            assert!(
                dropped.elapsed() < Duration::from_secs(3),
                "round {round}: not back within 3 s of the drop:\n{}",
                server.logs_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let lost = server
        .logs_text()
        .matches("lost the Redis risk store")
        .count();
    assert!(
        (1..=2).contains(&lost),
        "{lost} lines:\n{}",
        server.logs_text()
    );
}

/// A store that reads but refuses writes (a replica that became read-only after a failover, or
/// one out of memory under `noeviction`): each session reads it, then Redis refuses its first
/// write. Such a session does not start the backoff over as a dropped connection does, or the
/// replica would reconnect, and read the whole store, ten times a second while traffic lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_writes_is_reconnected_to_ever_more_slowly() {
    let redis = Redis::start();
    let signals = r#"  signals:
    repeated_step_ups:
      count: step_up
      key: subject
      window: 1m
      threshold: 100000
      action: block
      block_for: 1m
"#;
    let policy = policy("redis-read-only", &redis, signals);
    let (server, _admin) = replica(&policy).await;
    store_up(&server, true, Duration::from_secs(10)).await;
    let connections = || {
        let info = redis.command("INFO stats\r\n").unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("INFO stats names total_connections_received")
    };
    // A replica of a server that is not there: it keeps its data and refuses writes.
    let reply = redis
        .command("REPLICAOF 127.0.0.1 1\r\n")
        .unwrap_or_default();
    assert!(reply.starts_with("+OK"), "REPLICAOF: {reply}");
    let before = connections();
    let token = entra_token("mallory", &[], true);
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let d = decide(&server, &token, "payments.wire_transfer").await;
        assert_eq!(d.outcome(), Outcome::StepUp, "{d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Backing off from 100 ms, doubling: 6 sessions in 6 s, of two connections each (commands
    // and subscription), and the few this test's own commands take.
    let made = connections() - before;
    assert!(
        made <= 24,
        "{made} connections in 6 s to a store that refuses writes:\n{}",
        server.logs_text()
    );
    assert!(
        server.logs_text().contains("read only replica"),
        "the refusal is said:\n{}",
        server.logs_text()
    );
}

/// Redis loses its data (restarted without persistence, flushed, failed over to a replica
/// behind) while a replica holds an operator's hour-long block, and another replica's risk
/// signal writes a minute's block on the same subject before it reconnects. The signal's record
/// knows nothing of the operator's block: the replica keeps its hour and writes it back over the
/// minute. Before, it applied the minute, and the operator's block was gone from every replica a
/// minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_block_outlives_a_signals_written_where_redis_lost_it() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-lost-data", &redis, "");
    let (a, a_admin) = replica(&policy).await;
    store_up(&a, true, Duration::from_secs(10)).await;
    block_subject(&a_admin, "mallory", "INC-1", "1h");
    written(&redis, "subject|mallory", &a).await;
    let (_, operators) = stored_block(&redis, "subject|mallory").expect("written");
    redis.kill();
    store_up(&a, false, Duration::from_secs(10)).await;
    // Back empty, and another replica's signal (through the write script) writes first.
    let redis = Redis::start_on(port);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let signals = serde_json::json!({
        "removed": false, "reason_id": "risk.repeated_step_ups", "reason": "", "created_at": now,
        "expires_at": now + 60, "created_by": "risk:repeated_step_ups",
    })
    .to_string();
    let stamp = (now * 1000).to_string();
    assert_eq!(
        put_script(
            &redis,
            "subject|mallory",
            &stamp,
            &signals,
            "signal",
            now + 60,
            now
        ),
        ":1\r\n"
    );
    store_up(&a, true, Duration::from_secs(20)).await;
    eventually(
        "the operator's hour is written back over the signal's minute",
        Duration::from_secs(10),
        || async {
            stored_block(&redis, "subject|mallory").is_some_and(|(_, stored)| {
                stored["created_by"] == operators["created_by"]
                    && stored["expires_at"] == operators["expires_at"]
            })
        },
    )
    .await;
    let token = entra_token("mallory", &[], true);
    assert_eq!(decide(&a, &token, "reports.read").await.reason, "blocked");
}

/// One error reply (NOSCRIPT after a SCRIPT FLUSH; the same for OOM, BUSY, MISCONF, READONLY)
/// ending a session that had read the store is a blip: the replica is back at once, not after
/// what the backoff had grown to in an earlier outage (6.4 s here). Only sessions ended by error
/// replies one after the other back off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_error_reply_after_a_healthy_session_is_back_at_once() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-one-off-refusal", &redis, "");
    let (server, admin) = replica(&policy).await;
    store_up(&server, true, Duration::from_secs(10)).await;
    // An earlier outage of 3.5 s grows the backoff to 6.4 s.
    redis.kill();
    store_up(&server, false, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let redis = Redis::start_on(port);
    store_up(&server, true, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // One error reply: the scripts are gone (SCRIPT FLUSH, or a proxy's backend restarted).
    assert!(
        redis
            .command("SCRIPT FLUSH\r\n")
            .unwrap()
            .starts_with("+OK")
    );
    block_subject(&admin, "x", "INC-1", "1h");
    store_up(&server, false, Duration::from_secs(10)).await;
    let lost = Instant::now();
    store_up(&server, true, Duration::from_secs(20)).await;
    let took = lost.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "back after {took:?}:\n{}",
        server.logs_text()
    );
}

/// The revocations key holding a string (set by another client) is ignored on reading and on
/// writing back: a replica holding a revocation does not write it into the string, which Redis
/// refuses (WRONGTYPE), ending every session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_does_not_end_every_session() {
    let redis = Redis::start();
    let policy = policy("redis-wrong-type", &redis, "");
    let (server, admin) = replica(&policy).await;
    store_up(&server, true, Duration::from_secs(10)).await;
    admin_ok(
        &admin,
        &["revoke", "--subject", "dave", "--reason-id", "PW-1"],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(redis.command("DEL stepgate:revocations\r\n").is_some());
    assert!(
        redis
            .command("SET stepgate:revocations not-a-hash\r\n")
            .unwrap()
            .starts_with("+OK")
    );
    let errors = |server| async move {
        metric(server, "stepgate_risk_store_errors_total")
            .await
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The next session's resync (a dropped connection forces one now).
    for kind in ["normal", "pubsub"] {
        redis.command(&resp(&["CLIENT", "KILL", "TYPE", kind]));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = errors(&server).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = errors(&server).await;
    assert_eq!(
        after,
        before,
        "sessions keep failing:\n{}",
        server.logs_text()
    );
}

/// Redis loses a recent write (restarted from an older snapshot, failed over to a replica
/// behind) and comes back holding the older record of the same field: an operator's lift of
/// mallory's first block, made before the operator blocked mallory again. The replica that holds
/// the new block writes it back over the older lift, so that a replica started since (a
/// rollout, a scale-up) enforces it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_redis_lost_over_an_older_lift_is_written_back() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-lost-over-lift", &redis, "");
    let (a, a_admin) = replica(&policy).await;
    store_up(&a, true, Duration::from_secs(10)).await;
    let block = |ttl: &str| block_subject(&a_admin, "mallory", "INC-1", ttl);
    block("1d");
    written(&redis, "subject|mallory", &a).await;
    admin_ok(&a_admin, &["unblock", "--subject", "mallory"]);
    eventually("the lift is stored", Duration::from_secs(10), || async {
        stored_block(&redis, "subject|mallory").is_some_and(|(_, r)| r["removed"] == true)
    })
    .await;
    // What an older snapshot of Redis holds: the lift.
    let old = redis
        .command(&resp(&["HGET", "stepgate:blocks", "subject|mallory"]))
        .unwrap();
    let old = old
        .split_once("\r\n")
        .unwrap()
        .1
        .trim_end_matches("\r\n")
        .to_owned();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    block("1h");
    eventually(
        "the new block is stored",
        Duration::from_secs(10),
        || async {
            stored_block(&redis, "subject|mallory").is_some_and(|(_, r)| r["removed"] != true)
        },
    )
    .await;
    // Redis restarts from that snapshot: the new block is lost, the lift is back.
    redis.kill();
    store_up(&a, false, Duration::from_secs(10)).await;
    let redis = Redis::start_on(port);
    assert_eq!(
        redis.command(&resp(&["HSET", "stepgate:blocks", "subject|mallory", &old])),
        Some(":1\r\n".to_owned())
    );
    store_up(&a, true, Duration::from_secs(20)).await;
    let mallory = entra_token("mallory", &[], true);
    assert_eq!(decide(&a, &mallory, "reports.read").await.reason, "blocked");
    // A replica started now.
    let (b, _) = replica(&policy).await;
    store_up(&b, true, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored = stored_block(&redis, "subject|mallory").unwrap();
    let b_says = decide(&b, &mallory, "reports.read").await;
    assert!(
        stored.1["removed"] != true && b_says.reason == "blocked",
        "A blocks mallory, the store holds {stored:?} and B answers {:?}:\n{}",
        b_says.outcome(),
        a.logs_text()
    );
}

/// An operator lifts mallory on A; a second later another operator blocks mallory again on B
/// (the newer write, which wins in the store). A enforces B's block as soon as B's message
/// arrives: only messages published before A's own write of the field, while it is out, are
/// held back, not every message about a field changed here lately.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_block_from_another_replica_right_after_a_lift_here_is_applied() {
    let redis = Redis::start();
    let policy = policy("redis-lift-then-block", &redis, "");
    let (a, a_admin) = replica(&policy).await;
    let (b, b_admin) = replica(&policy).await;
    store_up(&a, true, Duration::from_secs(10)).await;
    store_up(&b, true, Duration::from_secs(10)).await;
    block_subject(&a_admin, "mallory", "INC-1", "1h");
    written(&redis, "subject|mallory", &a).await;
    admin_ok(&a_admin, &["unblock", "--subject", "mallory"]);
    eventually("the lift is stored", Duration::from_secs(10), || async {
        stored_block(&redis, "subject|mallory").is_some_and(|(_, r)| r["removed"] == true)
    })
    .await;
    // A second later, so that B's block is the newer write in the store.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    block_subject(&b_admin, "mallory", "INC-2", "1h");
    eventually("B's block is stored", Duration::from_secs(10), || async {
        stored_block(&redis, "subject|mallory").is_some_and(|(_, r)| r["removed"] != true)
    })
    .await;
    let mallory = entra_token("mallory", &[], true);
    assert_eq!(decide(&b, &mallory, "reports.read").await.reason, "blocked");
    eventually(
        "A enforces B's newer block before its next resync",
        Duration::from_secs(3),
        || async { decide(&a, &mallory, "reports.read").await.reason == "blocked" },
    )
    .await;
}

/// A refused write's reading back of what the store holds does not undo a newer change of the
/// same field made here whose write is still on its way. The store holds another replica's lift
/// stamped between A's two blocks (Redis busy meanwhile); A's first block is refused, and the
/// lift read back must not drop A's second block, which then wins in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_writes_read_back_does_not_undo_a_newer_change_here() {
    let redis = Redis::start();
    let policy = policy("redis-read-back", &redis, "");
    let (a, a_admin) = replica(&policy).await;
    store_up(&a, true, Duration::from_secs(10)).await;
    let channel = Endpoint::from_shared(a_admin.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> =
        format!("Bearer {}", operator_token()).parse().unwrap();
    let mut admin =
        AdminServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let now = now_ms / 1000;
    // Another replica's lift, stamped 1 s from now.
    seed_block(
        &redis,
        "subject|mallory",
        now_ms + 1000,
        serde_json::json!({"removed": true, "reason_id": "", "reason": "", "created_at": now,
            "expires_at": now + 3600, "created_by": ""}),
    );
    let t0 = Instant::now();
    let port = redis.port;
    let busy = std::thread::spawn(move || {
        let script = "local t=redis.call('TIME') local s=t[1]*1000000+t[2] \
            while true do local n=redis.call('TIME') \
            if n[1]*1000000+n[2]-s > 1600000 then break end end return 1";
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        use std::io::{Read, Write};
        s.write_all(resp(&["EVAL", script, "0"]).as_bytes())
            .unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let block = |id: &str| BlockRequest {
        target: Some(BlockTarget {
            kind: BlockKind::Subject as i32,
            value: "mallory".into(),
        }),
        reason_id: id.into(),
        reason: String::new(),
        ttl_seconds: 3600,
    };
    // W1: older than the stored lift, refused once Redis is free.
    admin.block(block("INC-1")).await.expect("block 1");
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(t0.elapsed())).await;
    // W2: newer than the lift, made while W1 is out.
    admin.block(block("INC-2")).await.expect("block 2");
    let w2_at = t0.elapsed();
    let busy = busy.join().unwrap();
    assert!(
        busy.starts_with(":1"),
        "the busy script: {busy} (W2 at {w2_at:?})"
    );
    eventually("W2 stored", Duration::from_secs(10), || async {
        stored_block(&redis, "subject|mallory").is_some_and(|(_, r)| r["reason_id"] == "INC-2")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mallory = entra_token("mallory", &[], true);
    let said = decide(&a, &mallory, "reports.read").await;
    assert_eq!(
        said.reason,
        "blocked",
        "A dropped its own operator's newer block: the store holds {:?}",
        stored_block(&redis, "subject|mallory")
    );
}

/// Two revocations of one subject made on two replicas while Redis is down: the later one
/// (revoking the tokens of before the incident) names an earlier time than the first (every
/// token up to now). Each replica keeps the later time, and so must the store: a revocation
/// written last but covering less does not shorten one that covers more. Before, the store kept
/// the newest write, and a replica started afterwards let through the tokens issued between the
/// two times that every other replica refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_revocation_covering_less_does_not_shorten_one_in_the_store() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-revocation-max", &redis, "");
    let (a, a_admin, b, b_admin) = two_replicas(&policy).await;
    redis.kill();
    for server in [&a, &b] {
        store_up(server, false, Duration::from_secs(10)).await;
    }
    let now = common::unix_now();
    admin_ok(
        &a_admin,
        &["revoke", "--subject", "erin", "--reason-id", "INC-7"],
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let incident = now - 3600;
    admin_ok(
        &b_admin,
        &[
            "revoke",
            "--subject",
            "erin",
            "--before",
            &incident.to_string(),
            "--reason-id",
            "INC-7",
        ],
    );
    let redis = Redis::start_on(port);
    for server in [&a, &b] {
        store_up(server, true, Duration::from_secs(30)).await;
    }
    // A token issued between the two times: refused by A, which revoked everything up to now.
    let erin = mint(&TokenSpec {
        subject: "erin".into(),
        extra: [("iat".to_owned(), (now - 60).into())]
            .into_iter()
            .collect(),
        ..TokenSpec::default()
    });
    eventually(
        "both replicas refuse erin's token of a minute ago",
        Duration::from_secs(10),
        || async {
            decide(&a, &erin, "reports.read").await.reason == "session_revoked"
                && decide(&b, &erin, "reports.read").await.reason == "session_revoked"
        },
    )
    .await;
    eventually(
        "the store keeps the revocation that covers more",
        Duration::from_secs(10),
        || async {
            stored_revocation(&redis, "erin").is_some_and(|r| r["before"].as_i64() >= Some(now))
        },
    )
    .await;
    // A replica started now reads the store alone.
    let (c, _) = replica(&policy).await;
    store_up(&c, true, Duration::from_secs(10)).await;
    let says = decide(&c, &erin, "reports.read").await;
    assert_eq!(
        says.reason,
        "session_revoked",
        "the store holds {:?}",
        stored_revocation(&redis, "erin")
    );
    // A store that holds one covering less all the same (a replica of a version that kept the
    // newest write): the replicas' next read of it writes theirs back.
    let mut shorter = stored_revocation(&redis, "erin").unwrap();
    shorter["before"] = incident.into();
    let stored = format!("{}|{shorter}", (common::unix_now() + 1) * 1000);
    redis.command(&resp(&["HSET", "stepgate:revocations", "erin", &stored]));
    for kind in ["normal", "pubsub"] {
        redis.command(&resp(&["CLIENT", "KILL", "TYPE", kind]));
    }
    eventually(
        "a replica writes back the revocation that covers more",
        Duration::from_secs(20),
        || async {
            stored_revocation(&redis, "erin").is_some_and(|r| r["before"].as_i64() >= Some(now))
        },
    )
    .await;
}

/// The write script keeps, of two revocations of one subject, the one that covers more, in
/// either order; a stored one that no replica could have written does not stand in the way.
#[test]
fn the_store_keeps_the_revocation_that_covers_more() {
    let redis = Redis::start();
    let now = common::unix_now();
    let put = |subject: &str, written_ago: i64, before: i64| -> String {
        let record = serde_json::json!({
            "before": before, "reason_id": "INC-9", "reason": "",
            "created_at": now - written_ago, "created_by": "san:ops",
        })
        .to_string();
        let stamp = ((now - written_ago) * 1000).to_string();
        put_script_to(
            &redis,
            "stepgate:revocations",
            subject,
            &stamp,
            &record,
            "revocation",
            before,
            now,
        )
    };
    let before = |subject: &str| stored_revocation(&redis, subject).map(|r| r["before"].clone());
    // Every token up to a minute ago, then (written later) those of before an hour ago.
    assert_eq!(put("erin", 60, now - 60), ":1\r\n");
    assert_eq!(put("erin", 10, now - 3600), ":0\r\n");
    assert_eq!(before("erin"), Some((now - 60).into()));
    // The other order: the one covering more written last replaces the other.
    assert_eq!(put("finn", 60, now - 3600), ":1\r\n");
    assert_eq!(put("finn", 120, now - 60), ":1\r\n");
    assert_eq!(before("finn"), Some((now - 60).into()));
    // As late as the stored one: refused, the stored one stays.
    assert_eq!(put("finn", 0, now - 60), ":0\r\n");
    // Stored by hand, revoking ten years ahead (every replica ignores it): written over.
    let forged = serde_json::json!({
        "before": now + 10 * 365 * 86_400, "reason_id": "X", "reason": "",
        "created_at": now, "created_by": "hand",
    });
    let stored = format!("{}|{forged}", now * 1000);
    redis.command(&resp(&["HSET", "stepgate:revocations", "gina", &stored]));
    assert_eq!(put("gina", 0, now - 60), ":1\r\n");
    assert_eq!(before("gina"), Some((now - 60).into()));
}

/// An operator lifts mallory's block. Redis then loses the lift: restarted empty, then holding
/// the block again, as a restart from a snapshot of before the lift would. The replicas keep the
/// lift as long as the block would have lasted: they write it back where it is missing, and
/// where the store holds the older block they do not take it back, but write the lift over it.
/// Before, such a snapshot blocked mallory again on every replica at their next read of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lift_redis_lost_is_written_back_and_the_block_not_taken_back() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-lost-lift", &redis, "");
    let (a, a_admin, b, _) = two_replicas(&policy).await;
    let mallory = entra_token("mallory", &[], true);
    block_subject(&a_admin, "mallory", "INC-3", "1d");
    written(&redis, "subject|mallory", &a).await;
    let (at, blocked) = stored_block(&redis, "subject|mallory").unwrap();
    eventually("B blocks mallory", Duration::from_secs(10), || async {
        decide(&b, &mallory, "reports.read").await.reason == "blocked"
    })
    .await;
    // A second apart: a block of the lift's own second would be taken as the newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    admin_ok(&a_admin, &["unblock", "--subject", "mallory"]);
    let lifted = |redis: &Redis| {
        stored_block(redis, "subject|mallory").is_some_and(|(_, r)| r["removed"] == true)
    };
    eventually("the lift is stored", Duration::from_secs(10), || async {
        lifted(&redis)
    })
    .await;
    eventually("B lifts mallory", Duration::from_secs(10), || async {
        decide(&b, &mallory, "reports.read").await.reason == "allowed"
    })
    .await;

    // Restarted empty: the lift is written back.
    redis.kill();
    let redis = Redis::start_on(port);
    eventually(
        "the lift is written back",
        Duration::from_secs(20),
        || async { lifted(&redis) },
    )
    .await;
    for server in [&a, &b] {
        store_up(server, true, Duration::from_secs(20)).await;
    }

    // Then what a restart from a snapshot of before the lift holds: the older block. Set while
    // the replicas are connected, then read by each as it reconnects.
    let snapshot = format!("{at}|{blocked}");
    hset(&redis, "stepgate:blocks", "subject|mallory", &snapshot);
    assert!(!lifted(&redis));
    for kind in ["normal", "pubsub"] {
        redis.command(&resp(&["CLIENT", "KILL", "TYPE", kind]));
    }
    eventually(
        "the lift is written over the older block",
        Duration::from_secs(20),
        || async { lifted(&redis) },
    )
    .await;
    for server in [&a, &b] {
        store_up(server, true, Duration::from_secs(20)).await;
    }
    eventually(
        "neither replica takes the block back",
        Duration::from_secs(10),
        || async {
            decide(&a, &mallory, "reports.read").await.reason == "allowed"
                && decide(&b, &mallory, "reports.read").await.reason == "allowed"
        },
    )
    .await;
}

/// A replica's read of the store deletes the entries past their time: a block that has ended and
/// a revocation past the 48 hours it is kept, not the others. The delete is the script's, which
/// deletes an entry only if it still holds what was read: a block another replica writes over an
/// ended one between a replica's read and its delete is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_past_their_time_are_deleted_unless_written_since() {
    let redis = Redis::start();
    let now = common::unix_now();
    let ended = serde_json::json!({
        "reason_id": "INC-1", "reason": "", "created_at": now - 7200,
        "expires_at": now - 3600, "created_by": "san:ops",
    });
    let live = serde_json::json!({
        "reason_id": "INC-2", "reason": "", "created_at": now - 60,
        "expires_at": now + 3600, "created_by": "san:ops",
    });
    seed_block(&redis, "subject|old", (now - 7200) * 1000, ended.clone());
    seed_block(&redis, "subject|new", (now - 60) * 1000, live);
    let revocation = |before: i64| {
        serde_json::json!({
            "before": before, "reason_id": "INC-3", "reason": "",
            "created_at": before, "created_by": "san:ops",
        })
    };
    let kept = 48 * 3600;
    for (subject, before) in [("gone", now - kept - 60), ("held", now - 60)] {
        let stored = format!("{}|{}", before * 1000, revocation(before));
        redis.command(&resp(&["HSET", "stepgate:revocations", subject, &stored]));
    }
    let policy = policy("redis-expired", &redis, "");
    let (a, _) = replica(&policy).await;
    store_up(&a, true, Duration::from_secs(10)).await;
    let fields = |key: &str| redis.command(&resp(&["HKEYS", key])).unwrap_or_default();
    eventually(
        "the ended entries are deleted",
        Duration::from_secs(10),
        || async {
            !fields("stepgate:blocks").contains("subject|old")
                && !fields("stepgate:revocations").contains("gone")
        },
    )
    .await;
    assert!(fields("stepgate:blocks").contains("subject|new"));
    assert!(fields("stepgate:revocations").contains("held"));

    // The script, as a replica calls it: it deletes what it read, not what was written since.
    let read = format!("{}|{ended}", (now - 7200) * 1000);
    let delete = |stored: &str| {
        redis.command(&resp(&[
            "EVAL",
            stepgate::risk::redis::DELETE,
            "2",
            "stepgate:blocks",
            "stepgate:blocks:writes",
            "subject|old",
            stored,
        ]))
    };
    let written_since = format!("{}|{}", now * 1000, serde_json::json!({"removed": true}));
    hset(&redis, "stepgate:blocks", "subject|old", &written_since);
    assert_eq!(delete(&read).as_deref(), Some(":0\r\n"));
    assert!(fields("stepgate:blocks").contains("subject|old"));
    redis.command(&resp(&["HSET", "stepgate:blocks", "subject|old", &read]));
    assert_eq!(delete(&read).as_deref(), Some(":1\r\n"));
    assert!(!fields("stepgate:blocks").contains("subject|old"));
}

/// A signal's block a replica evicts to make room is lifted in the store only if the store holds
/// a signal's block no newer than the eviction: an operator's block on the same source that the
/// replica had not heard of stays. And the read script says when it left fields unread past its
/// count, so that a replica does not take them for lost and write its own back at every read.
#[test]
fn an_eviction_lifts_only_a_signals_block_and_a_cut_read_says_so() {
    let redis = Redis::start();
    let now = common::unix_now();
    let ms = |ago: i64| ((now - ago) * 1000).to_string();
    let put = |field: &str, what: &str, ago: i64, by: &str| -> String {
        let record = serde_json::json!({
            "removed": what == "evict", "reason_id": "INC-8", "reason": "",
            "created_at": now - ago, "expires_at": now + 600, "created_by": by,
        })
        .to_string();
        let ends = if what == "evict" { 0 } else { now + 600 };
        put_script(&redis, field, &ms(ago), &record, what, ends, now)
    };
    let removed = |field: &str| stored_block(&redis, field).map(|(_, r)| r["removed"] == true);
    // An operator's block: not lifted by an eviction.
    assert_eq!(
        put("source|10.0.0.0/24", "operator", 30, "san:ops"),
        ":1\r\n"
    );
    assert_eq!(put("source|10.0.0.0/24", "evict", 0, ""), ":0\r\n");
    assert_eq!(removed("source|10.0.0.0/24"), Some(false));
    // A signal's: lifted.
    assert_eq!(
        put("source|10.0.1.0/24", "signal", 30, "risk:forged"),
        ":1\r\n"
    );
    assert_eq!(put("source|10.0.1.0/24", "evict", 0, ""), ":1\r\n");
    assert_eq!(removed("source|10.0.1.0/24"), Some(true));
    // A signal's newer than the eviction: kept. None at all: nothing written.
    assert_eq!(
        put("source|10.0.2.0/24", "signal", 0, "risk:forged"),
        ":1\r\n"
    );
    assert_eq!(put("source|10.0.2.0/24", "evict", 10, ""), ":0\r\n");
    assert_eq!(removed("source|10.0.2.0/24"), Some(false));
    assert_eq!(put("source|10.0.3.0/24", "evict", 0, ""), ":0\r\n");
    assert_eq!(removed("source|10.0.3.0/24"), None);
    // An eviction is no operator's lift: an operator's block made before it but held up (its
    // replica cut off), newer than the signal's, still replaces what is left of the signal's.
    assert_eq!(
        put("source|10.0.4.0/24", "signal", 30, "risk:forged"),
        ":1\r\n"
    );
    assert_eq!(put("source|10.0.4.0/24", "evict", 0, ""), ":1\r\n");
    assert_eq!(
        put("source|10.0.4.0/24", "operator", 10, "san:ops"),
        ":1\r\n"
    );
    assert_eq!(removed("source|10.0.4.0/24"), Some(false));

    // Four fields read two at a time: cut.
    let read = |max: &str| {
        redis
            .command(&resp(&[
                "EVAL",
                stepgate::risk::redis::READ,
                "1",
                "stepgate:blocks",
                "2048",
                "8192",
                max,
            ]))
            .unwrap_or_default()
    };
    assert!(read("2").ends_with(":1\r\n"), "{}", read("2"));
    assert!(read("4").ends_with(":0\r\n"), "{}", read("4"));
}

/// An operator's block and then its lift wait on a replica cut off; meanwhile a risk signal's
/// block, made after both, is written. The held-up block arrives first and replaces the
/// signal's shorter one (an operator's longer block wins over a signal's); then the lift, older
/// than the signal's block, arrives: it lifts the operator's block, but leaves the signal's,
/// the newest write, in force. Before, the script had forgotten the signal's block once the
/// operator's replaced it, and the lift left nothing blocked.
#[test]
fn a_signals_block_made_after_a_held_up_lift_stays() {
    let redis = Redis::start();
    let now = common::unix_now();
    let ms = |ago: i64| ((now - ago) * 1000).to_string();
    let put = |field: &str, what: &str, ago: i64, lasts: i64| {
        put_made(&redis, now, field, what, ago, lasts)
    };
    let held = |field: &str| {
        stored_block(&redis, field).map(|(_, r)| {
            if r["removed"] == true {
                "lift".to_owned()
            } else {
                r["created_by"].as_str().unwrap_or_default().to_owned()
            }
        })
    };
    // The signal's ten minutes (10 s ago), then the operator's held-up hour (30 s ago), then
    // its held-up lift (20 s ago).
    assert_eq!(put("subject|sam", "signal", 10, 600), ":1\r\n");
    assert_eq!(put("subject|sam", "operator", 30, 3600), ":1\r\n");
    assert_eq!(held("subject|sam").as_deref(), Some("san:ops"));
    assert_eq!(put("subject|sam", "lift", 20, 3600), ":0\r\n");
    assert_eq!(
        held("subject|sam").as_deref(),
        Some("risk:repeated_step_ups")
    );
    let (at, record) = stored_block(&redis, "subject|sam").unwrap();
    assert_eq!(at.to_string(), ms(10), "at the signal's time");
    assert_eq!(
        record["operator_at"].as_i64().map(|t| t.to_string()),
        Some(ms(20))
    );
    // An operator's write older than the lift is refused.
    assert_eq!(put("subject|sam", "operator", 25, 7200), ":0\r\n");
    assert_eq!(
        held("subject|sam").as_deref(),
        Some("risk:repeated_step_ups")
    );

    // A second held-up operator's block that outlasts the signal's replaces it too, and a lift
    // older than the signal's then still leaves the signal's block.
    assert_eq!(put("subject|tom", "signal", 10, 600), ":1\r\n");
    assert_eq!(put("subject|tom", "operator", 30, 3600), ":1\r\n");
    assert_eq!(put("subject|tom", "operator", 25, 7200), ":1\r\n");
    assert_eq!(held("subject|tom").as_deref(), Some("san:ops"));
    assert_eq!(put("subject|tom", "lift", 20, 7200), ":0\r\n");
    assert_eq!(
        held("subject|tom").as_deref(),
        Some("risk:repeated_step_ups")
    );
    // One that does not outlast it leaves the signal's in force.
    assert_eq!(put("subject|una", "signal", 10, 600), ":1\r\n");
    assert_eq!(put("subject|una", "operator", 30, 3600), ":1\r\n");
    assert_eq!(put("subject|una", "operator", 25, 60), ":0\r\n");
    assert_eq!(
        held("subject|una").as_deref(),
        Some("risk:repeated_step_ups")
    );
    // A signal's block refused because an operator's longer block is in force is kept with it
    // too: the operator's lift, made before the signal's block but held up, leaves the signal's
    // block in force; a lift after it lifts everything.
    for (field, lift_ago, left) in [
        ("subject|zed", 20, "risk:repeated_step_ups"),
        ("subject|zoe", 5, "lift"),
    ] {
        assert_eq!(put(field, "operator", 30, 3600), ":1\r\n");
        assert_eq!(put(field, "signal", 10, 600), ":0\r\n");
        assert_eq!(held(field).as_deref(), Some("san:ops"));
        let written = if left == "lift" { ":1\r\n" } else { ":0\r\n" };
        assert_eq!(put(field, "lift", lift_ago, 3600), written, "{field}");
        assert_eq!(held(field).as_deref(), Some(left), "{field}");
    }

    // A kept signal's block that has ended gives way to the next one refused; of two refused,
    // the longer is kept: the held-up lift older than both leaves it in force. And the record
    // keeps one, however many are refused.
    assert_eq!(put("subject|ann", "operator", 1000, 86_400), ":1\r\n");
    assert_eq!(put("subject|ann", "signal", 900, 60), ":0\r\n");
    for ago in (30..70).rev() {
        assert_eq!(put("subject|ann", "signal", ago, 600), ":0\r\n");
    }
    let (_, kept) = stored_block(&redis, "subject|ann").unwrap();
    assert!(kept.to_string().len() < 2048, "{kept}");
    assert_eq!(put("subject|ann", "lift", 80, 86_400), ":0\r\n");
    assert_eq!(
        held("subject|ann").as_deref(),
        Some("risk:repeated_step_ups")
    );
    assert_eq!(put("subject|bea", "operator", 50, 7200), ":1\r\n");
    assert_eq!(put("subject|bea", "signal", 40, 3600), ":0\r\n");
    assert_eq!(put("subject|bea", "signal", 30, 60), ":0\r\n");
    assert_eq!(put("subject|bea", "lift", 45, 7200), ":0\r\n");
    let (_, record) = stored_block(&redis, "subject|bea").unwrap();
    assert_eq!(
        record["expires_at"],
        now - 40 + 3600,
        "the longer one: {record}"
    );

    // A lift newer than the signal's block is the newest write: it lifts everything.
    assert_eq!(put("subject|vic", "signal", 10, 600), ":1\r\n");
    assert_eq!(put("subject|vic", "operator", 30, 3600), ":1\r\n");
    assert_eq!(put("subject|vic", "lift", 5, 3600), ":1\r\n");
    assert_eq!(held("subject|vic").as_deref(), Some("lift"));

    // A signal's block that has ended is not brought back: the held-up lift, arriving once the
    // signal's minute is over, lifts the operator's hour.
    let at = |made: i64, what: &str, lasts: i64, writer_now: i64| {
        let record = serde_json::json!({
            "removed": what == "lift", "reason_id": "INC-7", "reason": "",
            "created_at": made, "expires_at": made + lasts,
            "created_by": if what == "signal" { "risk:repeated_step_ups" } else { "san:ops" },
        })
        .to_string();
        let ends = if what == "lift" { 0 } else { made + lasts };
        let stamp = (made * 1000).to_string();
        put_script(
            &redis,
            "subject|wes",
            &stamp,
            &record,
            what,
            ends,
            writer_now,
        )
    };
    let base = now - 1000;
    assert_eq!(at(base + 20, "signal", 60, base + 20), ":1\r\n");
    assert_eq!(at(base, "operator", 3600, base + 30), ":1\r\n");
    assert_eq!(at(base + 10, "lift", 3600, now), ":1\r\n");
    assert_eq!(held("subject|wes").as_deref(), Some("lift"));

    // What no replica writes does not stand in a write's way: a `displaced` written by hand (a
    // lift, or a block ending in 300 000 years) is no signal's block to bring back.
    for displaced in [
        "1".to_owned(),
        "true".to_owned(),
        "null".to_owned(),
        r#"{"removed":true,"expires_at":9000000000000}"#.to_owned(),
        serde_json::json!({
            "reason_id": "X", "created_at": now, "expires_at": 9_000_000_000_000_i64,
            "created_by": "risk:repeated_step_ups",
        })
        .to_string(),
    ] {
        let forged = serde_json::json!({
            "displaced": displaced, "operator_at": (now - 30) * 1000, "reason_id": "INC-8",
            "created_at": now - 30, "expires_at": now + 3600, "created_by": "san:ops",
        });
        let stored = format!("{}|{forged}", (now - 10) * 1000);
        redis.command(&resp(&["HSET", "stepgate:blocks", "subject|xia", &stored]));
        assert_eq!(
            put("subject|xia", "lift", 20, 3600),
            ":1\r\n",
            "{displaced}"
        );
        assert_eq!(held("subject|xia").as_deref(), Some("lift"));
    }
    // Nor an operators' time no clock could give: a held-up operator's hour still replaces the
    // signal's minute that carries it.
    for operator_at in ["9000000000000000000", "1e300"] {
        let forged = format!(
            r#"{{"operator_at":{operator_at},"reason_id":"risk.x","reason":"","created_at":{},"expires_at":{},"created_by":"risk:repeated_step_ups"}}"#,
            now - 10,
            now + 50
        );
        let stored = format!("{}|{forged}", (now - 10) * 1000);
        redis.command(&resp(&["HSET", "stepgate:blocks", "subject|yuri", &stored]));
        assert_eq!(
            put("subject|yuri", "operator", 30, 3600),
            ":1\r\n",
            "{operator_at}"
        );
        assert_eq!(held("subject|yuri").as_deref(), Some("san:ops"));
    }
}

/// A signal's block written over an operator's lift keeps the lift's time (`operator_at`) in the
/// store. Redis then restarts empty, and the replicas write the signal's block back: with that
/// time, so that an operator's block older than the lift, held up on a replica cut off, does
/// not replace it as if no operator had lifted since. Before, the block written back said
/// nothing of the lift, and the held-up block replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signals_block_written_back_keeps_the_operators_last_word() {
    let mut redis = Redis::start();
    let port = redis.port;
    let policy = policy("redis-signal-write-back", &redis, "");
    let (a, _, b, _) = two_replicas(&policy).await;
    let now = common::unix_now();
    let lifted_ms = (now - 20) * 1000 + 123;
    let signals = serde_json::json!({
        "operator_at": lifted_ms, "reason_id": "risk.step_ups", "reason": "",
        "created_at": now - 10, "expires_at": now + 600, "created_by": "risk:step_ups",
    });
    let signal_ms = (now - 10) * 1000 + 456;
    let stored = format!("{signal_ms}|{signals}");
    redis.command(&resp(&["HSET", "stepgate:blocks", "subject|yan", &stored]));
    for kind in ["normal", "pubsub"] {
        redis.command(&resp(&["CLIENT", "KILL", "TYPE", kind]));
    }
    let yan = entra_token("yan", &[], true);
    eventually(
        "both replicas read the signal's block",
        Duration::from_secs(20),
        || async {
            decide(&a, &yan, "reports.read").await.reason == "blocked"
                && decide(&b, &yan, "reports.read").await.reason == "blocked"
        },
    )
    .await;

    redis.kill();
    let redis = Redis::start_on(port);
    eventually(
        "the signal's block is written back",
        Duration::from_secs(20),
        || async { stored_block(&redis, "subject|yan").is_some() },
    )
    .await;
    let (at, record) = stored_block(&redis, "subject|yan").unwrap();
    assert_eq!(
        (at, record["operator_at"].as_i64()),
        (signal_ms, Some(lifted_ms)),
        "{record}"
    );
    // An operator's hour, made before the lift and held up: refused.
    let operators = serde_json::json!({
        "reason_id": "INC-9", "reason": "", "created_at": now - 30,
        "expires_at": now + 3600, "created_by": "san:ops",
    });
    let reply = put_script(
        &redis,
        "subject|yan",
        &((now - 30) * 1000).to_string(),
        &operators.to_string(),
        "operator",
        now + 3600,
        now,
    );
    assert_eq!(reply, ":0\r\n");
    let (_, record) = stored_block(&redis, "subject|yan").unwrap();
    assert_eq!(record["created_by"], "risk:step_ups");
}

/// The SHA-1 of `text` in hex, as Redis's `redis.sha1hex` gives it.
fn sha1_hex(text: &str) -> String {
    let reply = Redis::start()
        .command(&resp(&["EVAL", "return redis.sha1hex(ARGV[1])", "0", text]))
        .unwrap_or_default();
    reply.lines().nth(1).unwrap_or_default().to_owned()
}

/// Sets `field` of hash `key` to `value` as another client would, whatever it holds.
fn hset(redis: &Redis, key: &str, field: &str, value: &str) {
    redis.command(&resp(&["HSET", key, field, value]));
}

/// What `field` of the blocks hash holds, as stored (`<ms>|<record>`).
fn stored_value(redis: &Redis, field: &str) -> Option<String> {
    let reply = redis.command(&resp(&["HGET", "stepgate:blocks", field]))?;
    let value = reply.split_once("\r\n")?.1.trim_end_matches("\r\n");
    (!reply.starts_with("$-1")).then(|| value.to_owned())
}

/// `DELETE` as a replica calls it on `field`, read as `stored`: its reply.
fn delete_as_read(redis: &Redis, field: &str, stored: &str) -> Option<String> {
    redis.command(&resp(&[
        "EVAL",
        stepgate::risk::redis::DELETE,
        "2",
        "stepgate:blocks",
        "stepgate:blocks:writes",
        field,
        stored,
    ]))
}

/// The writes the script keeps for `field` (`stepgate:blocks:writes`), as stored.
fn kept_writes(redis: &Redis, field: &str) -> Option<serde_json::Value> {
    let reply = redis.command(&resp(&["HGET", "stepgate:blocks:writes", field]))?;
    let value = reply.split_once("\r\n")?.1.trim_end_matches("\r\n");
    serde_json::from_str(value).ok()
}

/// How many writes the script keeps for `field`.
fn kept_count(redis: &Redis, field: &str) -> usize {
    kept_writes(redis, field)
        .and_then(|log| log["writes"].as_array().map(Vec::len))
        .unwrap_or_default()
}

/// The writes the script keeps per field are few and bounded: from the operators' last word on,
/// the signals' blocks in force that no newer one outlasts. Signals' blocks each newer and
/// longer than the last keep one; each newer and shorter than the last (every one of them could
/// still be the one left by a late lift) keep at most 32, the oldest folded into one; and the
/// field still ends on a block.
#[test]
fn the_writes_kept_per_field_are_few_and_bounded() {
    let redis = Redis::start();
    let now = common::unix_now();
    let put = |field: &str, what: &str, ago: i64, lasts: i64| {
        put_made(&redis, now, field, what, ago, lasts)
    };
    assert_eq!(put("subject|kai", "operator", 500, 3600), ":1\r\n");
    for ago in (100..400).rev().step_by(10) {
        assert_eq!(put("subject|kai", "signal", ago, 3600), ":1\r\n", "{ago}");
    }
    assert_eq!(
        kept_count(&redis, "subject|kai"),
        2,
        "{:?}",
        kept_writes(&redis, "subject|kai")
    );

    assert_eq!(put("subject|lia", "lift", 500, 3600), ":1\r\n");
    // Made 399 s, 394 s, … 104 s ago, each ending 10 s before the one before it.
    let ends = |ago: i64| now + 7200 - 10 * (400 - ago);
    for (i, ago) in (100..400).rev().step_by(5).enumerate() {
        let written = if i == 0 { ":1\r\n" } else { ":0\r\n" };
        let lasts = ends(ago) - (now - ago);
        assert_eq!(put("subject|lia", "signal", ago, lasts), written, "{ago}");
    }
    let kept = kept_count(&redis, "subject|lia");
    assert!(
        kept <= 32,
        "{kept}: {:?}",
        kept_writes(&redis, "subject|lia")
    );
    let (_, record) = stored_block(&redis, "subject|lia").unwrap();
    assert_eq!(
        record["expires_at"],
        ends(399),
        "the first, longest: {record}"
    );
    // A lift made between two of them (197 s ago, among the newest kept), arriving late: the
    // next one stands. (Further back, among the writes folded into one, it would be taken as
    // older than all of them.)
    let folded = kept_writes(&redis, "subject|lia").unwrap()["writes"][0].clone();
    assert_eq!(folded["what"], "state", "{folded}");
    assert_eq!(put("subject|lia", "lift", 197, 3600), ":0\r\n");
    let (_, record) = stored_block(&redis, "subject|lia").unwrap();
    assert_eq!(record["expires_at"], ends(194), "{record}");
}

/// Evictions of one block from many replicas (each evicts the same, the one ending first)
/// keep one: a late operator's block older than all of them still stands, as it does in
/// write-time order.
#[test]
fn many_evictions_of_one_block_keep_one_and_a_late_operators_block_stands() {
    let redis = Redis::start();
    let now = common::unix_now();
    let field = "source|192.0.2.0/24";
    let signal = serde_json::json!({
        "removed": false, "reason_id": "risk.x", "reason": "", "created_at": now - 60,
        "expires_at": now + 3600, "created_by": "risk:x",
    })
    .to_string();
    let at = |ago_ms: i64| (now * 1000 - ago_ms).to_string();
    let reply = put_script(
        &redis,
        field,
        &at(60_000),
        &signal,
        "signal",
        now + 3600,
        now,
    );
    assert_eq!(reply, ":1\r\n");
    let eviction = serde_json::json!({
        "removed": true, "reason_id": "risk.x", "reason": "", "created_at": now - 50,
        "expires_at": now + 3600, "created_by": "risk:x", "evicted_created_at": now - 60,
    })
    .to_string();
    for i in 0..40 {
        put_script(
            &redis,
            field,
            &at(50_000 - i * 100),
            &eviction,
            "evict",
            0,
            now,
        );
    }
    assert_eq!(
        kept_count(&redis, field),
        2,
        "{:?}",
        kept_writes(&redis, field)
    );
    let operators = serde_json::json!({
        "removed": false, "reason_id": "INC-1", "reason": "", "created_at": now - 55,
        "expires_at": now + 7200, "created_by": "san:ops",
    })
    .to_string();
    let reply = put_script(
        &redis,
        field,
        &at(55_000),
        &operators,
        "operator",
        now + 7200,
        now,
    );
    assert_eq!(reply, ":1\r\n");
    let (_, record) = stored_block(&redis, field).unwrap();
    assert_eq!(record["created_by"], "san:ops", "{record}");
}

/// A field written by the script's previous version (which kept one record, with the operators'
/// time and one signal's block it kept beside it) is read as the writes it stands for: a lift
/// older than the kept signal's block, arriving now, leaves that block; an operator's block
/// older than a signal's record's operators' time is refused.
#[test]
fn a_record_the_previous_script_wrote_is_read_as_the_writes_it_stands_for() {
    let redis = Redis::start();
    let now = common::unix_now();
    let ms = |ago: i64| (now - ago) * 1000;
    let signal = serde_json::json!({
        "removed": false, "reason_id": "risk.x", "reason": "", "created_at": now - 20,
        "expires_at": now + 600, "created_by": "risk:x",
    });
    let operators = serde_json::json!({
        "displaced": signal.to_string(), "displaced_at": ms(20), "operator_at": ms(30),
        "removed": false, "reason_id": "INC-1", "reason": "", "created_at": now - 30,
        "expires_at": now + 3600, "created_by": "san:ops",
    });
    seed_block(&redis, "subject|old1", ms(20), operators);
    assert_eq!(
        put_made(&redis, now, "subject|old1", "lift", 25, 3600),
        ":0\r\n"
    );
    let (_, record) = stored_block(&redis, "subject|old1").unwrap();
    assert_eq!(record["created_by"], "risk:x", "{record}");

    let signals = serde_json::json!({
        "operator_at": ms(40), "removed": false, "reason_id": "risk.x", "reason": "",
        "created_at": now - 10, "expires_at": now + 60, "created_by": "risk:x",
    });
    seed_block(&redis, "subject|old2", ms(10), signals);
    assert_eq!(
        put_made(&redis, now, "subject|old2", "operator", 50, 3600),
        ":0\r\n"
    );
    let (_, record) = stored_block(&redis, "subject|old2").unwrap();
    assert_eq!(record["created_by"], "risk:x", "{record}");
    // One newer than it is written over the signal's shorter block.
    assert_eq!(
        put_made(&redis, now, "subject|old2", "operator", 35, 3600),
        ":1\r\n"
    );
}

/// What is kept of a field's writes, written by hand or corrupt, never stops a write (a script
/// error would refuse every write of the field): it is taken as nothing. And deleting the field
/// past its time deletes what is kept of it.
#[test]
fn junk_among_the_writes_kept_stops_no_write_and_goes_with_the_field() {
    let redis = Redis::start();
    let now = common::unix_now();
    let junk = [
        "not json",
        "[]",
        "5",
        r#"{"writes":5}"#,
        r#"{"result":"{EMPTY}","writes":{"a":1}}"#,
        r#"{"result":"{EMPTY}","writes":[1,"x",null,{"at":"1"},{"at":1,"what":"signal"}]}"#,
        r#"{"result":"{EMPTY}","writes":[{"at":1,"what":"state","state":7}]}"#,
        r#"{"result":"{EMPTY}","writes":[{"at":1,"what":"state","state":{"at":1,"what":"evict"}}]}"#,
        r#"{"result":"{EMPTY}","writes":[{"at":1e300,"what":"operator","ends":1e300,"record":"{}"}]}"#,
        r#"{"result":"{EMPTY}","writes":[{"at":1,"what":"mark"},{"at":2,"what":"signal","ends":9e15,"record":"x"}]}"#,
        r#"{"result":"{EMPTY}","writes":[{"at":-5000,"what":"operator","ends":1,"record":"{}"}]}"#,
        r#"{"result":"{EMPTY}","writes":[{"at":5,"what":"state","op":-1}]}"#,
    ];
    for (i, junk) in junk.iter().enumerate() {
        let field = format!("subject|junk{i}");
        // Taken as the kept writes of a field that holds nothing: the SHA-1 of "".
        let junk = junk.replace("{EMPTY}", "da39a3ee5e6b4b0d3255bfef95601890afd80709");
        redis.command(&resp(&["HSET", "stepgate:blocks:writes", &field, &junk]));
        assert_eq!(
            put_made(&redis, now, &field, "operator", 10, 3600),
            ":1\r\n",
            "{junk}"
        );
        let (_, record) = stored_block(&redis, &field).unwrap();
        assert_eq!(record["created_by"], "san:ops", "{junk}: {record}");
    }

    // Nor a stored record holding what cjson cannot write again, nor kept writes that do (a
    // signal's block kept, then a shorter one refused over it, writes them again).
    let now_ms = now * 1000;
    let forged = format!(
        r#"{{"removed":true,"reason_id":"","created_at":{now},"expires_at":{},"x":1e999}}"#,
        now + 60
    );
    hset(
        &redis,
        "stepgate:blocks",
        "subject|inf",
        &format!("{}|{forged}", now_ms - 5000),
    );
    assert_eq!(
        put_made(&redis, now, "subject|inf", "operator", 3, 3600),
        ":1\r\n"
    );
    assert_eq!(
        put_made(&redis, now, "subject|inf", "lift", 2, 3600),
        ":1\r\n"
    );
    assert_eq!(
        put_made(&redis, now, "subject|kept", "signal", 5, 3600),
        ":1\r\n"
    );
    let mut log = kept_writes(&redis, "subject|kept").unwrap();
    log["writes"][0]["x"] = serde_json::json!(1);
    let text = log.to_string().replace("\"x\":1", "\"x\":1e999");
    hset(&redis, "stepgate:blocks:writes", "subject|kept", &text);
    assert_eq!(
        put_made(&redis, now, "subject|kept", "signal", 4, 60),
        ":0\r\n"
    );
    assert_eq!(
        put_made(&redis, now, "subject|kept", "lift", 3, 3600),
        ":1\r\n"
    );
    // An operators' time before 1970 in a stored record: no stamp the script cannot write.
    let forged = format!(
        r#"{{"operator_at":-5,"reason_id":"INC-1","created_at":{now},"expires_at":{},"created_by":"san:ops"}}"#,
        now + 3600
    );
    hset(
        &redis,
        "stepgate:blocks",
        "subject|negative",
        &format!("{}|{forged}", now_ms - 5000),
    );
    assert_eq!(
        put_made(&redis, now, "subject|negative", "signal", 2, 60),
        ":0\r\n"
    );
    assert_eq!(
        put_made(&redis, now, "subject|negative", "lift", 1, 3600),
        ":1\r\n"
    );
    // Two marks of one millisecond, one of them with a text for an end: no comparison fails.
    let (at, _) = stored_block(&redis, "subject|kept").unwrap();
    let value = stored_value(&redis, "subject|kept").unwrap();
    let marks = serde_json::json!({
        "result": sha1_hex(&value),
        "writes": [{"at": at - 10, "what": "mark"}, {"at": at - 10, "what": "mark", "ends": "x"}],
    });
    hset(
        &redis,
        "stepgate:blocks:writes",
        "subject|kept",
        &marks.to_string(),
    );
    assert_eq!(
        put_made(&redis, now, "subject|kept", "operator", 1, 3600),
        ":1\r\n"
    );
    // A key of another type under the kept writes' name: writes and deletes go on, none kept.
    redis.command(&resp(&["DEL", "stepgate:blocks:writes"]));
    redis.command(&resp(&[
        "SET",
        "stepgate:blocks:writes",
        "another client's",
    ]));
    assert_eq!(
        put_made(&redis, now, "subject|typed", "operator", 1, 3600),
        ":1\r\n"
    );
    let stored = stored_value(&redis, "subject|typed").unwrap();
    assert_eq!(
        delete_as_read(&redis, "subject|typed", &stored).as_deref(),
        Some(":1\r\n")
    );
    redis.command(&resp(&["DEL", "stepgate:blocks:writes"]));

    // A write that leaves the field holding nothing (a signal's block over by the time it
    // arrives) keeps nothing: no read of the store would find it to delete.
    assert_eq!(
        put_made(&redis, now, "subject|late", "signal", 120, 60),
        ":0\r\n"
    );
    assert!(stored_block(&redis, "subject|late").is_none());
    assert!(kept_writes(&redis, "subject|late").is_none());

    // A field written by a version that kept no writes, after this one: what was kept is
    // dropped, and the field taken as the writes it stands for.
    assert_eq!(
        put_made(&redis, now, "subject|mixed", "operator", 9, 3600),
        ":1\r\n"
    );
    assert_eq!(
        put_made(&redis, now, "subject|mixed", "signal", 8, 7200),
        ":1\r\n"
    );
    assert_eq!(kept_count(&redis, "subject|mixed"), 2);
    let lift = serde_json::json!({"removed": true, "created_at": now - 7, "expires_at": now + 60});
    hset(
        &redis,
        "stepgate:blocks",
        "subject|mixed",
        &format!("{}|{lift}", (now - 7) * 1000),
    );
    assert_eq!(
        put_made(&redis, now, "subject|mixed", "signal", 6, 60),
        ":1\r\n"
    );
    assert_eq!(
        kept_count(&redis, "subject|mixed"),
        2,
        "{:?}",
        kept_writes(&redis, "subject|mixed")
    );

    // Past its time, the field and its writes are deleted together.
    assert_eq!(
        put_made(&redis, now, "subject|gone", "operator", 100, 10),
        ":1\r\n"
    );
    assert!(kept_writes(&redis, "subject|gone").is_some());
    let stored = stored_value(&redis, "subject|gone").unwrap();
    assert_eq!(
        delete_as_read(&redis, "subject|gone", &stored).as_deref(),
        Some(":1\r\n")
    );
    assert!(stored_block(&redis, "subject|gone").is_none());
    assert!(kept_writes(&redis, "subject|gone").is_none());
}

/// The port of the primary `sentinel` names now.
fn sentinels_primary(sentinel: &Redis) -> Option<u16> {
    let reply = sentinel.command(&resp(&["SENTINEL", "get-master-addr-by-name", "primary"]))?;
    reply.lines().last()?.trim().parse().ok()
}

/// Whether `sentinel` knows the server on `port` as a replica whose link to the primary is up:
/// one it would fail over to.
fn sentinel_knows_replica(sentinel: &Redis, port: u16) -> bool {
    let reply = sentinel
        .command(&resp(&["SENTINEL", "replicas", "primary"]))
        .unwrap_or_default();
    let fields: Vec<&str> = reply
        .lines()
        .filter(|l| !l.starts_with(['$', '*']))
        .collect();
    fields.windows(2).any(|w| w == ["port", &port.to_string()])
        && fields.windows(2).any(|w| w == ["master-link-status", "ok"])
        && !fields
            .iter()
            .any(|f| f.contains("disconnected") || f.contains("s_down"))
}

/// Redis Sentinel (`redis+sentinel://`): the replicas find the primary through the sentinels,
/// and follow it through a failover with both servers up (the old primary, now a replica,
/// would refuse every write: each replica sees it at its next ping and asks the sentinels
/// again) and through the primary hanging. Blocks made before and after each failover are
/// enforced by the replica that did not make them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_the_primary_sentinel_names_through_failovers() {
    let mut first = Redis::start();
    let mut second = Redis::replica_of(first.port);
    let sentinel = Redis::sentinel_of(first.port);
    let primary = || sentinels_primary(&sentinel);
    eventually(
        "the sentinel knows the replica",
        Duration::from_secs(15),
        || async { sentinel_knows_replica(&sentinel, second.port) },
    )
    .await;
    let text = demo_policy_without_risk()
        + &format!("\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"] }}\n")
        + &format!(
            "risk:\n  store: redis+sentinel://127.0.0.1:{}/primary\n",
            sentinel.port
        );
    let policy = TempPolicy::new("redis-sentinel", &text);
    let (a, a_admin, b, _) = two_replicas(&policy).await;
    let blocked_on_b = |subject: &'static str| {
        let b = &b;
        async move {
            let token = entra_token(subject, &[], true);
            decide(b, &token, "reports.read").await.reason == "blocked"
        }
    };
    block_subject(&a_admin, "alice", "INC-1", "1h");
    eventually("alice blocked on B", Duration::from_secs(10), || {
        blocked_on_b("alice")
    })
    .await;
    assert!(stored_block(&first, "subject|alice").is_some());

    // A failover with both servers up.
    let reply = sentinel.command(&resp(&["SENTINEL", "FAILOVER", "primary"]));
    assert_eq!(reply.as_deref(), Some("+OK\r\n"));
    eventually(
        "the second server is the primary",
        Duration::from_secs(15),
        || async { primary() == Some(second.port) },
    )
    .await;
    block_subject(&a_admin, "bob", "INC-2", "1h");
    eventually(
        &format!("bob blocked on B\nA:\n{}", a.logs_text()),
        Duration::from_secs(30),
        || blocked_on_b("bob"),
    )
    .await;
    // Left at a ping: the old primary says it is one for seconds more, until the sentinel
    // makes it a replica (and takes writes meanwhile, which it then drops).
    eventually(
        &format!("A leaves the old primary\n{}", a.logs_text()),
        Duration::from_secs(8),
        || async { a.logs_text().contains("the sentinels name another primary") },
    )
    .await;
    // On the new primary, even when A wrote it to the old one in the moment before that one
    // was made a replica (which then drops what it held): A writes back what the store lacks.
    eventually(
        &format!("bob's block on the new primary\nA:\n{}", a.logs_text()),
        Duration::from_secs(30),
        || async { stored_block(&second, "subject|bob").is_some() },
    )
    .await;

    // The primary hangs, once the first server, now its replica, is one to fail over to.
    eventually(
        "the sentinel knows the first server as a replica",
        Duration::from_secs(20),
        || async { sentinel_knows_replica(&sentinel, first.port) },
    )
    .await;
    second.freeze();
    eventually(
        "the first server is the primary again",
        Duration::from_secs(20),
        || async { primary() == Some(first.port) },
    )
    .await;
    block_subject(&a_admin, "carol", "INC-3", "1h");
    eventually(
        &format!("carol blocked on B\nA:\n{}", a.logs_text()),
        Duration::from_secs(20),
        || blocked_on_b("carol"),
    )
    .await;
    for subject in ["alice", "bob"] {
        assert!(blocked_on_b(subject).await, "{subject} still blocked on B");
    }
    assert!(stored_block(&first, "subject|carol").is_some());
    store_up(&b, true, Duration::from_secs(5)).await;
    // The sentinel first: it would make whatever server took a port it knows (another test's)
    // a replica, and these keep their ports until it is gone.
    drop(sentinel);
    second.kill();
    first.kill();
}

/// A change the write script fails on, session after session (here: the blocks key turned into
/// a string by another client), is dropped after three tries, with a line naming its field:
/// it does not hold up every other change and the replica's reading of the store for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_script_keeps_failing_on_is_dropped_not_retried_for_ever() {
    let redis = Redis::start();
    let policy = policy("redis-poison", &redis, "");
    let (server, admin) = replica(&policy).await;
    store_up(&server, true, Duration::from_secs(10)).await;
    redis.command(&resp(&["SET", "stepgate:blocks", "another client's"]));
    block_subject(&admin, "mallory", "INC-9", "1h");
    eventually(
        &format!("the change dropped\n{}", server.logs_text()),
        Duration::from_secs(20),
        || async {
            server
                .logs_text()
                .contains("failed 3 times on a change: dropped")
        },
    )
    .await;
    assert!(server.logs_text().contains("subject|mallory"));
    // The replica reads the store again (the blocks key it ignores) and is up.
    store_up(&server, true, Duration::from_secs(20)).await;
    // Still blocked here: the change holds where it was made.
    let token = entra_token("mallory", &[], true);
    assert_eq!(
        decide(&server, &token, "reports.read").await.reason,
        "blocked"
    );
}
