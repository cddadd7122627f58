//! Decision records against the real binary: one JSON line per decision in their own file (not
//! the application log), holding the request's facts, what verification established and the
//! decision — never the token or a claim the policy does not read; attributes only from the
//! allow-list; subjects as a keyed hash when a key is given; ALLOWs sampled while every STEP_UP and
//! DENY is kept; the file rotated by size.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::{Server, Spawn, TempPolicy, demo_policy_without_risk, entra, mint};
use serde_json::Value;
use stepgate::{
    api::v1::{
        DecideRequest, decide_request::Credential, decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};

/// The demo policy with `records` (a subject key file beside it when `hashed`).
fn policy(name: &str, records: &str, hashed: bool) -> TempPolicy {
    let policy = TempPolicy::new(name, &(demo_policy_without_risk() + records));
    if hashed {
        let key = policy.path.parent().unwrap().join("records.key");
        std::fs::write(key, "9f1c2b7e4d5a6c3b8e0f1a2d3c4b5a69\n").unwrap();
    }
    policy
}

/// The demo policy with `records` (writing `decisions.jsonl` beside it), served: (policy, the
/// records file, server).
async fn recording(name: &str, records: &str) -> (TempPolicy, PathBuf, Server) {
    let policy = policy(name, records, false);
    let file = policy.path.parent().unwrap().join("decisions.jsonl");
    let server = Server::start(&policy.path).await;
    (policy, file, server)
}

fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits until `path` holds `n` records (the writer flushes every 100 ms).
async fn wait_records(path: &Path, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let records = read_records(path);
        if records.len() >= n {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} records in {}", path.display());
}

async fn decide(server: &Server, token: &str, operation: &str, amount: f64) {
    let mut attributes = serde_json::Map::new();
    attributes.insert("amount".into(), amount.into());
    attributes.insert("note".into(), "not on the allow-list".into());
    DecisionServiceClient::new(server.channel().await)
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.to_owned())),
            operation: operation.into(),
            attributes: Some(stepgate::api::json_to_struct(&attributes)),
            ..Default::default()
        })
        .await
        .expect("Decide answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_per_decision_with_its_facts_and_never_the_token() {
    let (_policy, file, server) = recording(
        "records",
        "records:\n  enabled: true\n  path: decisions.jsonl\n  attributes: [amount]\n",
    )
    .await;
    let token = mint(&TokenSpec {
        subject: "alice".into(),
        ..entra(&["c1"], &["cp1"])
    });
    decide(&server, &token, "payments.wire_transfer", 25_000.0).await;
    decide(&server, &token, "customers.read", 1.0).await;
    let records = wait_records(&file, 2).await;
    let step_up = &records[0];
    assert_eq!(
        (
            &step_up["door"],
            &step_up["operation"],
            &step_up["outcome"],
            &step_up["reason"],
            &step_up["rule"],
            &step_up["status"]
        ),
        (
            &Value::from("decide"),
            &Value::from("payments.wire_transfer"),
            &Value::from("STEP_UP"),
            &Value::from("missing_auth_context"),
            &Value::from("wire-transfer"),
            &Value::from(401)
        ),
        "{step_up}"
    );
    assert_eq!(
        step_up["attributes"],
        serde_json::json!({"amount": 25000.0})
    );
    assert_eq!(
        step_up["challenge"]["auth_contexts"],
        serde_json::json!(["c1", "c2"])
    );
    let facts = &step_up["token"];
    assert_eq!(facts["issuer"], "demo-entra");
    assert_eq!(facts["subject"], "alice");
    assert_eq!(facts["acrs"], serde_json::json!(["c1"]));
    assert_eq!(facts["xms_cc"], serde_json::json!(["cp1"]));
    assert!(facts["auth_time"].is_i64());
    assert_eq!(
        records[1]["shadow"],
        serde_json::json!(["customer-data-strict:STEP_UP:missing_auth_context"])
    );
    // Never the token nor a piece of it, and not in the application log either.
    let text = std::fs::read_to_string(&file).unwrap();
    let signature = token.rsplit('.').next().unwrap();
    assert!(!text.contains(signature) && !text.contains(&token[..40]));
    assert!(!text.contains("not on the allow-list"));
    assert!(!server.logs_text().contains("\"challenge\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_request_makes_a_small_record_and_a_query_token_is_never_recorded() {
    let (_policy, file, server) = recording(
        "records-hostile",
        "records:\n  enabled: true\n  path: decisions.jsonl\n",
    )
    .await;
    let token = mint(&entra(&["c1"], &["cp1"]));
    let mut client = DecisionServiceClient::new(server.channel().await);
    // 200 000 control characters as the operation (six bytes each once escaped in JSON), and a
    // path of 100 000 bytes.
    let refused = client
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.clone())),
            operation: "\u{1}".repeat(200_000),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner();
    assert_eq!(refused.reason, "malformed_request", "{refused:?}");
    let long = client
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.clone())),
            http: Some(stepgate::api::v1::HttpRequest {
                method: "GET".into(),
                path: format!("/reports/{}", "a".repeat(100_000)),
                host: "app.example".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner();
    assert_eq!(
        long.outcome(),
        stepgate::api::v1::Outcome::Allow,
        "{long:?}"
    );
    // A token in the query, beside the header's: refused as two credentials, and not recorded.
    let query_token = mint(&TokenSpec::default());
    let two = client
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.clone())),
            http: Some(stepgate::api::v1::HttpRequest {
                method: "GET".into(),
                path: format!("/reports?x=1&access_token={query_token}"),
                host: "app.example".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner();
    assert_eq!(two.reason, "multiple_credentials", "{two:?}");

    let records = wait_records(&file, 3).await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.len() < 16 * 1024,
        "{} bytes of records for three requests",
        text.len()
    );
    assert!(!text.contains(&query_token), "a raw token in the records");
    assert!(!text.contains(&token), "a raw token in the records");
    assert_eq!(records[0]["reason"], "malformed_request");
    assert_eq!(records[0]["truncated"], serde_json::json!(["operation"]));
    assert_eq!(records[1]["truncated"], serde_json::json!(["path"]));
    assert!(
        records[1]["path"]
            .as_str()
            .unwrap()
            .starts_with("/reports/aaaa")
    );
    assert_eq!(records[2]["path"], "/reports?x=1&access_token=REDACTED");
    assert!(records[2].get("truncated").is_none(), "{}", records[2]);
}

/// What a caller without a credential can make is bounded per second; a verified caller's
/// records are all kept beside them, and nothing goes uncounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_without_a_verified_token_are_recorded_at_most_unverified_per_second() {
    let policy = policy(
        "records-unverified",
        "records:\n  enabled: true\n  path: decisions.jsonl\n  unverified_per_second: 5\n",
        false,
    );
    let file = policy.path.parent().unwrap().join("decisions.jsonl");
    let server = Server::start_with_metrics(&policy.path).await;
    let token = mint(&entra(&["c1"], &["cp1"]));
    let mut client = DecisionServiceClient::new(server.channel().await);
    let second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let (first, mut forged) = (second(), token.clone());
    forged.push('x');
    const ANONYMOUS: usize = 60;
    for i in 0..ANONYMOUS {
        // No token, and a token whose signature does not verify: neither is a verified caller.
        let credential = (i % 2 == 1).then(|| Credential::Token(forged.clone()));
        let refused = client
            .decide(DecideRequest {
                credential,
                operation: "payments.wire_transfer".into(),
                ..Default::default()
            })
            .await
            .expect("Decide answers")
            .into_inner();
        assert_eq!(refused.http_status, 401, "{refused:?}");
    }
    let last = second();
    for _ in 0..3 {
        decide(&server, &token, "payments.wire_transfer", 100.0).await;
    }
    wait_records(&file, 3 + 5).await;
    // The writer flushes every 100 ms: anything still queued is written by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records_now = read_records(&file);
    let verified = records_now
        .iter()
        .filter(|r| r.get("token").is_some())
        .count();
    let unverified = records_now.len() - verified;
    assert_eq!(verified, 3, "every verified decision is recorded");
    let bound = 5 * (last - first + 1) as usize;
    assert!(
        (5..=bound).contains(&unverified),
        "{unverified} records of {ANONYMOUS} decisions without a verified token in {} s",
        last - first + 1
    );
    let metrics = server.scrape().await;
    for series in [
        format!(
            "stepgate_records_total{{result=\"written\"}} {}",
            records_now.len()
        ),
        format!(
            "stepgate_records_total{{result=\"rate_limited\"}} {}",
            ANONYMOUS - unverified
        ),
    ] {
        assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
    }
}

/// A verified caller an operator blocked is still a verified caller: each of its decisions is
/// recorded, with who it was, however many anonymous ones crowd the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_verified_caller_is_recorded_whole_beside_an_anonymous_flood() {
    let policy = policy(
        "records-blocked",
        &format!(
            "admin: {{ issuers: [demo-oidc], roles: [\"{}\"] }}\nrecords:\n  enabled: true\n  path: decisions.jsonl\n  unverified_per_second: 1\n",
            common::ADMIN_ROLE
        ),
        false,
    );
    let file = policy.path.parent().unwrap().join("decisions.jsonl");
    let (server, admin) = common::serve_with_admin(&policy.path, false).await;
    common::admin_ok(
        &admin,
        &[
            "block",
            "--subject",
            "mallory",
            "--reason-id",
            "INC-9",
            "--ttl",
            "1h",
        ],
    );
    let mallory = mint(&TokenSpec {
        subject: "mallory".into(),
        ..entra(&["c1"], &["cp1"])
    });
    let mut client = DecisionServiceClient::new(server.channel().await);
    for _ in 0..5 {
        for _ in 0..10 {
            let anonymous = client
                .decide(DecideRequest {
                    operation: "payments.wire_transfer".into(),
                    ..Default::default()
                })
                .await
                .expect("Decide answers")
                .into_inner();
            assert_eq!(anonymous.http_status, 401);
        }
        let blocked = client
            .decide(DecideRequest {
                credential: Some(Credential::Token(mallory.clone())),
                operation: "payments.wire_transfer".into(),
                ..Default::default()
            })
            .await
            .expect("Decide answers")
            .into_inner();
        assert_eq!(blocked.reason, "blocked", "{blocked:?}");
    }
    wait_records(&file, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let blocked: Vec<Value> = read_records(&file)
        .into_iter()
        .filter(|r| r["reason"] == "blocked")
        .collect();
    assert_eq!(
        blocked.len(),
        5,
        "every decision on the blocked caller is recorded"
    );
    for record in &blocked {
        assert_eq!(record["token"]["subject"], "mallory", "{record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allows_are_sampled_subjects_hashed_and_the_file_rotated() {
    let policy = policy(
        "records-sampled",
        "records:\n  enabled: true\n  path: decisions.jsonl\n  allow_sample: 0.25\n  max_bytes: 1MiB\n  keep: 2\n  subject_key_file: records.key\n",
        true,
    );
    let dir = policy.path.parent().unwrap().to_owned();
    let file = dir.join("decisions.jsonl");
    let server = Server::start_with_metrics(&policy.path).await;
    let allowed = mint(&TokenSpec {
        subject: "bob".into(),
        ..entra(&["c1"], &["cp1"])
    });
    let stepped = mint(&TokenSpec {
        subject: "bob".into(),
        ..entra(&[], &["cp1"])
    });
    for _ in 0..40 {
        decide(&server, &allowed, "reports.read", 1.0).await;
    }
    for _ in 0..5 {
        decide(&server, &stepped, "payments.wire_transfer", 1.0).await;
    }
    let records = wait_records(&file, 15).await;
    let allows = records.iter().filter(|r| r["outcome"] == "ALLOW").count();
    let step_ups = records.iter().filter(|r| r["outcome"] == "STEP_UP").count();
    assert_eq!(
        (allows, step_ups),
        (10, 5),
        "a quarter of the ALLOWs, every STEP_UP"
    );
    for record in &records {
        let weight = if record["outcome"] == "ALLOW" {
            serde_json::json!(4)
        } else {
            Value::Null
        };
        assert_eq!(
            record["weight"], weight,
            "a kept ALLOW stands for four: {record}"
        );
    }
    let subject = records[0]["token"]["subject"].as_str().unwrap();
    assert!(
        subject.starts_with("hmac-sha256:") && subject.len() == "hmac-sha256:".len() + 32,
        "{subject}"
    );
    assert!(
        records.iter().all(|r| r["token"]["subject"] == subject),
        "one subject, one hash"
    );
    assert!(!std::fs::read_to_string(&file).unwrap().contains("\"bob\""));
    let metrics = server.scrape().await;
    for series in [
        "stepgate_records_total{result=\"written\"} 15",
        "stepgate_records_total{result=\"sampled_out\"} 30",
        "stepgate_records_total{result=\"dropped\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
    }
    drop(server);

    // Rotation: a server writing records of about 1 KiB until past 1 MiB twice keeps the
    // current file and two rotated ones.
    let big = policy.path.parent().unwrap().join("big.yaml");
    std::fs::write(
        &big,
        demo_policy_without_risk()
            + "records:\n  enabled: true\n  path: big.jsonl\n  max_bytes: 1MiB\n  keep: 2\n  attributes: [note]\n",
    )
    .unwrap();
    let server = Server::start(&big).await;
    let mut client = DecisionServiceClient::new(server.channel().await);
    let note = "x".repeat(1000);
    for _ in 0..2_300 {
        let mut attributes = serde_json::Map::new();
        attributes.insert("note".into(), note.clone().into());
        client
            .decide(DecideRequest {
                credential: Some(Credential::Token(allowed.clone())),
                operation: "reports.read".into(),
                attributes: Some(stepgate::api::json_to_struct(&attributes)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).ok();
    let (current, first, second) = (size("big.jsonl"), size("big.jsonl.1"), size("big.jsonl.2"));
    assert!(
        current.is_some() && first.is_some() && second.is_some(),
        "{current:?} {first:?} {second:?}"
    );
    assert!(first.unwrap() <= 1024 * 1024 && second.unwrap() <= 1024 * 1024);
    assert!(size("big.jsonl.3").is_none(), "keep: 2");
}

/// A graceful stop (SIGTERM) writes the records of every decision made before the process
/// ends, the last ones included (the writer would otherwise have held them up to 100 ms): here
/// calls are still arriving when the signal comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_made_before_a_graceful_stop_has_its_record() {
    let policy = TempPolicy::new("records-stop", &demo_policy_without_risk());
    let file = policy.path.parent().unwrap().join("records.jsonl");
    let mut server = Server::spawn_with(
        &policy.path,
        Spawn {
            args: vec!["--records".into(), file.display().to_string()],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let token = mint(&TokenSpec::default());
    let client = DecisionServiceClient::new(server.channel().await);
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = client.clone();
        let token = token.clone();
        let answered = std::sync::Arc::clone(&answered);
        callers.spawn(async move {
            // Until the server stops answering.
            while let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_secs(5),
                client.decide(DecideRequest {
                    credential: Some(Credential::Token(token.clone())),
                    operation: "orders.list".into(),
                    ..Default::default()
                }),
            )
            .await
            {
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "a clean exit: {status:?}"
    );
    callers.join_all().await;
    let answered = answered.load(std::sync::atomic::Ordering::Relaxed);
    let records = read_records(&file);
    assert!(answered > 0, "calls were answered before the stop");
    assert!(
        records.len() >= answered,
        "{} records for {answered} answered decisions\n{}",
        records.len(),
        server.logs_text()
    );
}

/// Records written to a stdout nobody reads fill the queue: they are dropped and counted, never
/// the decisions, and an error line says so (before, the drops were only counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_dropped_on_a_full_queue_are_said_in_the_log() {
    let policy = TempPolicy::new("records-unread", &demo_policy_without_risk());
    let server = Server::spawn_with(
        &policy.path,
        Spawn {
            args: vec!["--records".into(), "-".into()],
            stdout_unread: true,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let token = mint(&TokenSpec::default());
    let client = DecisionServiceClient::new(server.channel().await);
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let token = token.clone();
        callers.spawn(async move {
            for _ in 0..2000 {
                let answer = client
                    .decide(DecideRequest {
                        credential: Some(Credential::Token(token.clone())),
                        operation: "orders.list".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("decided, whatever becomes of the record");
                assert_eq!(
                    answer.into_inner().outcome(),
                    stepgate::api::v1::Outcome::Allow
                );
            }
        });
    }
    callers.join_all().await;
    assert!(
        server
            .wait_for_text(Duration::from_secs(5), &["decision records queue is full"])
            .await,
        "{}",
        server.logs_text()
    );
}

#[test]
fn a_bad_records_section_is_refused_with_its_field_path() {
    for (records, path) in [
        ("records:\n  allow_sample: 2\n", "records.allow_sample"),
        (
            "records:\n  subject_key_file: missing.key\n",
            "records.subject_key_file",
        ),
        ("records:\n  max_bytes: 1KiB\n", "records.max_bytes"),
    ] {
        let policy = TempPolicy::new("records-bad", &(demo_policy_without_risk() + records));
        let (code, _, stderr) = common::check_policy(&policy.path);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(path), "{path}: {stderr}");
    }
}
