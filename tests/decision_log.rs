//! The decision log's levels, through the real binary: STEP_UP and DENY lines at info, ALLOW
//! lines at debug (so not in the default log), `--log-allow-sample` raising an even share of the
//! ALLOWs to info, `stepgate::decision=debug` logging every one; the metrics count every decision
//! whatever is logged. In the text format (the default) a decision line stays one line whatever
//! a caller put in the text it is made of.

mod common;

use std::time::Duration;

use common::{Server, Spawn, check_from, demo_policy_path, entra, mint};
use serde_json::Value;

const ALLOWS: usize = 10;

/// Serves the demo with `args`, sends ten allowed `Check`s and then one without a token (a DENY),
/// and returns the decision lines once the DENY's is written (lines keep their order), with the
/// metrics text.
async fn decisions(args: &[&str]) -> (Vec<Value>, String) {
    let spawn = Spawn {
        args: args.iter().map(|a| a.to_string()).collect(),
        metrics: true,
        ..Spawn::default()
    };
    let server = Server::spawn_with(&demo_policy_path(), spawn);
    server.wait_ready().await;
    let token = mint(&entra(&[], &[]));
    for i in 0..ALLOWS {
        let (status, ..) = check_from(
            &server,
            &format!("/api/orders/{i}"),
            "203.0.113.9",
            Some(&token),
        )
        .await;
        assert_eq!(status, 200, "ALLOW expected");
    }
    let (status, ..) = check_from(&server, "/api/orders/x", "203.0.113.9", None).await;
    assert_eq!(status, 401);
    let deny = server
        .wait_for_log(Duration::from_secs(10), |l| {
            l["target"] == "stepgate::decision" && l["outcome"] == "DENY"
        })
        .await;
    assert!(deny.is_some(), "no DENY line:\n{}", server.logs_text());
    assert_eq!(deny.unwrap()["level"], "INFO");
    let lines = server
        .json_logs()
        .into_iter()
        .filter(|l| l["target"] == "stepgate::decision")
        .collect();
    (lines, server.scrape().await)
}

fn allows(lines: &[Value]) -> Vec<&Value> {
    lines.iter().filter(|l| l["outcome"] == "ALLOW").collect()
}

fn counted_allows(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("stepgate_decisions_total{")
                && l.contains("outcome=\"ALLOW\"")
                && l.contains("rule=\"everything-else\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn by_default_allows_are_counted_not_logged() {
    let (lines, metrics) = decisions(&[]).await;
    assert!(allows(&lines).is_empty(), "{lines:#?}");
    assert_eq!(lines.len(), 1, "only the DENY: {lines:#?}");
    assert_eq!(counted_allows(&metrics), ALLOWS as f64, "{metrics}");
}

#[tokio::test]
async fn a_sampled_share_of_allows_is_logged_at_info() {
    // One worker: the sampling counts per worker thread, so here exactly every other ALLOW.
    let (lines, metrics) = decisions(&["--workers", "1", "--log-allow-sample", "0.5"]).await;
    let sampled = allows(&lines);
    assert_eq!(sampled.len(), ALLOWS / 2, "{lines:#?}");
    for line in sampled {
        assert_eq!(
            (&line["level"], &line["sampled"]),
            (&Value::from("INFO"), &Value::from(2))
        );
    }
    assert_eq!(counted_allows(&metrics), ALLOWS as f64);
}

#[tokio::test]
async fn debug_on_the_decision_target_logs_every_allow() {
    let (lines, _) = decisions(&["--log-level", "info,stepgate::decision=debug"]).await;
    let logged = allows(&lines);
    assert_eq!(logged.len(), ALLOWS, "{lines:#?}");
    assert!(
        logged
            .iter()
            .all(|l| l["level"] == "DEBUG" && l.get("sampled").is_none())
    );
}

#[test]
fn a_share_outside_zero_to_one_is_refused() {
    let out = std::process::Command::new(common::bin())
        .args(["serve", "--config"])
        .arg(demo_policy_path())
        .args(["--log-allow-sample", "1.5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--log-allow-sample") && stderr.contains("from 0 to 1"),
        "{stderr}"
    );
}

/// A token whose header names no algorithm but a line break and a made-up log line, as an
/// anonymous caller may send it (nothing else in it is looked at).
fn token_with_alg(alg: &str) -> String {
    use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
    let segment = |value: Value| URL_SAFE_NO_PAD.encode(value.to_string());
    format!(
        "{}.{}.c2lnbmF0dXJl",
        segment(serde_json::json!({"alg": alg, "typ": "JWT"})),
        segment(serde_json::json!({"iss": "https://issuer.example"}))
    )
}

/// `2026-12-06T03:44:24.082522Z  INFO stepgate::decision: …`: a timestamp, a level and a target,
/// as tracing-subscriber's text format writes every line.
fn is_text_log_line(line: &str) -> bool {
    let Some((stamp, rest)) = line.split_once(' ') else {
        return false;
    };
    let stamp_ok = stamp.len() == 27
        && stamp.as_bytes()[10] == b'T'
        && stamp.ends_with('Z')
        && stamp[..4].bytes().all(|b| b.is_ascii_digit());
    let mut words = rest.trim_start().splitn(3, ' ');
    let level_ok = words
        .next()
        .is_some_and(|l| ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&l));
    let target_ok = words
        .next()
        .is_some_and(|t| t.ends_with(':') && t.len() > 1);
    stamp_ok && level_ok && target_ok
}

#[tokio::test]
async fn a_token_cannot_forge_a_text_log_line() {
    use stepgate::api::v1::{
        DecideRequest, decide_request::Credential, decision_service_client::DecisionServiceClient,
    };
    let server = Server::spawn_text(&demo_policy_path(), &[]);
    server.wait_ready().await;
    let token = token_with_alg("\r\nFORGED line");
    let (status, ..) = check_from(&server, "/api/orders/1", "203.0.113.9", Some(&token)).await;
    assert_eq!(status, 401);
    let answer = DecisionServiceClient::new(server.channel().await)
        .decide(DecideRequest {
            credential: Some(Credential::Token(token)),
            operation: "orders.read".into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner();
    assert_eq!(answer.reason, "algorithm_not_allowed");
    assert!(
        server
            .wait_for_text(
                Duration::from_secs(10),
                &[
                    "door=\"check\" outcome=\"DENY\"",
                    "door=\"decide\" outcome=\"DENY\""
                ]
            )
            .await,
        "no decision lines:\n{}",
        server.logs_text()
    );
    let logs = server.logs();
    for line in &logs {
        assert!(
            is_text_log_line(line),
            "not a log line: {line:?}\n{logs:#?}"
        );
        assert!(!line.contains('\r'), "a carriage return in {line:?}");
    }
    let decisions: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains(" stepgate::decision: "))
        .collect();
    assert_eq!(decisions.len(), 2, "{logs:#?}");
    for line in decisions {
        assert!(
            line.contains(
                "stepgate::decision: the access token algorithm \"\\r\\nFORGED line\" is not \
                 allowed door="
            ),
            "{line}"
        );
    }
}
