//! Policy reload on SIGHUP, against the real binary: an invalid policy is refused with its field
//! path and the old one keeps deciding; a valid changed policy takes over.

mod common;

use std::time::{Duration, Instant};

use common::{Server, TempPolicy, WIRE_REQUIRE, demo_policy_text, edit, entra, mint};
use stepgate::api::v1::{
    DecideRequest, DecideResponse, Outcome, decide_request::Credential,
    decision_service_client::DecisionServiceClient,
};
use tonic::transport::Channel;

async fn wire_transfer(client: &mut DecisionServiceClient<Channel>, token: &str) -> DecideResponse {
    client
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.to_owned())),
            operation: "payments.wire_transfer".into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner()
}

/// Sends SIGHUP and waits for the reload's outcome log line (refused or reloaded) that comes after
/// the `seen` lines already captured.
async fn hup_and_wait(server: &Server, seen: usize, wanted: &str) -> serde_json::Value {
    server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = server.json_logs();
        if let Some(line) = lines.iter().skip(seen).find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("policy reload"))
        }) {
            let message = line["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(wanted),
                "expected a `{wanted}` line after SIGHUP, got: {line}\n{}",
                server.logs_text()
            );
            return line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no reload log line within 10 s of SIGHUP:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_refuses_an_invalid_policy_keeps_the_old_one_and_applies_a_valid_change() {
    let original = demo_policy_text();
    let policy = TempPolicy::new("reload", &original);
    let server = Server::start(&policy.path).await;
    let mut client = DecisionServiceClient::new(server.channel().await);
    let token = mint(&entra(&[], &["cp1"]));

    let before = wire_transfer(&mut client, &token).await;
    assert_eq!(before.outcome(), Outcome::StepUp, "{before:?}");
    assert_eq!(before.reason, "missing_auth_context");

    // 1. A parse error (bad duration): refused, with the field path in the log.
    policy.write(&edit(
        &original,
        WIRE_REQUIRE,
        "require: { auth_contexts: [c1], max_age: fifteen }",
    ));
    let seen = server.logs().len();
    let refused = hup_and_wait(&server, seen, "refused").await;
    assert_eq!(refused["level"], "ERROR", "{refused}");
    assert!(
        refused.to_string().contains("rules[1].require.max_age"),
        "the refusal must name the field path: {refused}"
    );
    let after_bad = wire_transfer(&mut client, &token).await;
    assert_eq!(
        after_bad.outcome(),
        Outcome::StepUp,
        "old policy keeps deciding"
    );
    assert_eq!(after_bad.rule, "wire-transfer");

    // 2. A compile error (undeclared auth context): refused as well.
    policy.write(&edit(
        &original,
        WIRE_REQUIRE,
        "require: { auth_contexts: [c9], max_age: 15m }",
    ));
    let seen = server.logs().len();
    let refused = hup_and_wait(&server, seen, "refused").await;
    assert!(
        refused
            .to_string()
            .contains("rules[1].require.auth_contexts[0]"),
        "the refusal must name the field path: {refused}"
    );
    let still = wire_transfer(&mut client, &token).await;
    assert_eq!(
        still.outcome(),
        Outcome::StepUp,
        "old policy keeps deciding"
    );

    // 3. A valid change: wire transfers no longer need c1.
    policy.write(&edit(&original, WIRE_REQUIRE, "require: { max_age: 15m }"));
    let seen = server.logs().len();
    let reloaded = hup_and_wait(&server, seen, "reloaded").await;
    assert_eq!(reloaded["level"], "INFO", "{reloaded}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = wire_transfer(&mut client, &token).await;
        if now.outcome() == Outcome::Allow {
            assert_eq!(now.rule, "wire-transfer");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {:?}/{} 10 s after a successful reload:\n{}",
            now.outcome(),
            now.reason,
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Keys were carried over / reloaded: other tokens still verify, and the server is healthy.
    server.wait_ready().await;
    let other = mint(&entra(&["c1"], &["cp1"]));
    let other = wire_transfer(&mut client, &other).await;
    assert_eq!(other.outcome(), Outcome::Allow, "{other:?}");
}
