//! Shadow mode against the real binary and the real Envoy: a rule or an escalation with
//! `mode: shadow` is evaluated and its would-be outcome recorded — in the decision log line, the
//! `stepgate_shadow_decisions_total` metric, the explain trace, Envoy's dynamic metadata (its
//! access log) and `Decide`'s `shadow` field — while the next matching rule (or the rule without
//! the escalation) decides, and nothing of it reaches the client.

mod common;
#[path = "common/envoy.rs"]
mod envoy;

use std::time::Duration;

use common::{Server, TempPolicy, demo_policy_text, entra, mint};
use stepgate::{
    api::v1::{
        DecideRequest, Outcome, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};

/// The demo policy (its `customer-data-strict` rule is in shadow mode) with a shadow escalation
/// on the wire-transfer rule: transfers in another currency would need a compliant device.
fn policy() -> TempPolicy {
    let text = common::edit(
        &demo_policy_text(),
        "        require: { auth_contexts: [c1, c2] }\n",
        "        require: { auth_contexts: [c1, c2] }\n      - when: 'has(request.attributes.currency) && request.attributes.currency != \"EUR\"'\n        require: { auth_contexts: [c2] }\n        mode: shadow\n",
    );
    TempPolicy::new("shadow", &text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_rules_and_escalations_are_recorded_everywhere_but_never_enforced() {
    let policy = policy();
    let server = Server::start_with_metrics(&policy.path).await;
    let alice = mint(&TokenSpec {
        subject: "alice".into(),
        ..entra(&["c1"], &["cp1"])
    });
    let mut client = DecisionServiceClient::new(server.channel().await);

    // The shadow rule matches /customers/42 and would ask for c3; the catch-all decides (ALLOW).
    let answer = client
        .decide(DecideRequest {
            credential: Some(Credential::Token(alice.clone())),
            operation: "customers.read_profile".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (answer.outcome(), answer.rule.as_str()),
        (Outcome::Allow, "everything-else")
    );
    let [shadow] = answer.shadow.as_slice() else {
        panic!("one shadow outcome expected: {answer:?}");
    };
    assert_eq!(
        (
            shadow.rule.as_str(),
            shadow.escalation,
            shadow.outcome(),
            shadow.reason.as_str()
        ),
        (
            "customer-data-strict",
            None,
            Outcome::StepUp,
            "missing_auth_context"
        )
    );
    // The explain trace (offline, where it is always on) says what the shadow rule would do.
    let out = std::process::Command::new(common::bin())
        .args(["decide", "--config"])
        .arg(&policy.path)
        .args([
            "--operation",
            "customers.read_profile",
            "--explain",
            "--token",
            &alice,
        ])
        .output()
        .unwrap();
    let decided: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let steps = decided["explain"].to_string();
    assert!(
        steps.contains(
            "rule \\\"customer-data-strict\\\" (shadow) matches and would answer STEP_UP missing_auth_context"
        ),
        "{steps}"
    );
    // The shadow escalation holds for USD: it would ask for c2 as well; the transfer is allowed.
    let mut attributes = serde_json::Map::new();
    attributes.insert("amount".into(), 500.into());
    attributes.insert("currency".into(), "USD".into());
    let answer = client
        .decide(DecideRequest {
            credential: Some(Credential::Token(alice.clone())),
            operation: "payments.wire_transfer".into(),
            attributes: Some(stepgate::api::json_to_struct(&attributes)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.outcome(), Outcome::Allow, "{answer:?}");
    let [shadow] = answer.shadow.as_slice() else {
        panic!("{answer:?}");
    };
    assert_eq!(
        (
            shadow.rule.as_str(),
            shadow.escalation,
            shadow.outcome(),
            shadow.reason.as_str()
        ),
        (
            "wire-transfer",
            Some(1),
            Outcome::StepUp,
            "missing_auth_context"
        )
    );

    // The decision log line and the metric carry both.
    let line = server
        .wait_for_log(Duration::from_secs(5), |l| {
            l["target"] == "stepgate::decision" && l["rule"] == "wire-transfer"
        })
        .await
        .expect("the wire transfer's decision line");
    assert_eq!(
        line["shadow"],
        "wire-transfer/escalate[1]:STEP_UP:missing_auth_context"
    );
    let metrics = server.scrape().await;
    for series in [
        "stepgate_shadow_decisions_total{rule=\"customer-data-strict\",outcome=\"STEP_UP\",reason=\"missing_auth_context\"} 1",
        "stepgate_shadow_decisions_total{rule=\"wire-transfer/escalate[1]\",outcome=\"STEP_UP\",reason=\"missing_auth_context\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == series), "{series}\n{metrics}");
    }

    // Through the real Envoy: the client gets the enforced answer and nothing of the shadow; the
    // access log (dynamic metadata) has it.
    let echo = envoy::Echo::start().await;
    let proxy = envoy::Envoy::start(envoy::ENVOY_YAML, server.port, echo.port).await;
    let response = reqwest::Client::new()
        .get(proxy.url("/customers/42"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = format!("{:?}", response.headers());
    let body = response.text().await.unwrap();
    assert!(
        !headers.contains("shadow") && !body.contains("customer-data-strict"),
        "{headers} {body}"
    );
    let upstream = echo.requests();
    let seen = upstream.last().expect("the upstream got the request");
    assert!(seen.header_all("x-stepgate-shadow").is_empty());
    let line = proxy
        .wait_for_access_log(Duration::from_secs(10), |l| {
            l.starts_with("GET /customers/42 ")
        })
        .await
        .expect("an access log line");
    assert!(
        line.contains("shadow=customer-data-strict:STEP_UP:missing_auth_context"),
        "{line}"
    );
}
