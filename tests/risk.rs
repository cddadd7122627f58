//! Risk signals against the real binary, one replica, the in-memory store: counts over sliding
//! windows reaching their threshold escalate to a step-up (then expire with the window), block a
//! source or a token, feed `risk.<name>` in CEL, and show in the admin API and the metrics; a
//! flood of distinct keys stays within `risk.max_keys`; a `risk:` section that does not compile
//! is refused with its field path.

mod common;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use common::{
    ADMIN_ROLE, Server, Spawn, TempPolicy, admin_ok, check_from, check_on,
    demo_policy_without_risk, mint,
};
use serde_json::Value;
use stepgate::{
    api::v1::{
        DecideRequest, DecideResponse, Outcome, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};

/// The demo policy with `risk` appended (and admin rights for demo-oidc `stepgate.admin`
/// tokens), served with an admin listener and metrics: (policy, server, admin URL).
async fn start(name: &str, risk: &str) -> (TempPolicy, Server, String) {
    let text = demo_policy_without_risk()
        + &format!("\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"] }}\n")
        + risk;
    let policy = TempPolicy::new(name, &text);
    let (server, admin_url) = common::serve_with_admin(&policy.path, true).await;
    (policy, server, admin_url)
}

/// The count of `signal` in `stepgate admin counts <target>`.
fn count_of(admin_url: &str, target: &[&str], signal: &str) -> (u64, bool) {
    let mut args = vec!["counts"];
    args.extend(target);
    let counts = admin_ok(admin_url, &args);
    let row = counts["counts"]
        .as_array()
        .expect("counts")
        .iter()
        .find(|c| c["signal"] == signal)
        .unwrap_or_else(|| panic!("no {signal} in {counts}"))
        .clone();
    (row["count"].as_u64().unwrap(), row["reached"] == true)
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

/// An Entra token of `subject` carrying `acrs`, from a client that handles claims challenges.
fn entra_token(subject: &str, acrs: &[&str]) -> String {
    mint(&TokenSpec {
        subject: subject.into(),
        acrs: acrs.iter().map(|s| s.to_string()).collect(),
        xms_cc: vec!["cp1".into()],
        ..TokenSpec::default()
    })
}

const STEP_UPS: &str = r#"
risk:
  signals:
    repeated_step_ups:
      description: A subject prompted again and again must use phishing-resistant MFA.
      count: step_up
      key: subject
      window: 2s
      threshold: 3
      action: step_up
      require: { auth_contexts: [c3] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_a_caller_trips_itself_never_weakens_a_rules_acr() {
    // The admin rule accepts phishing-resistant sign-ins only. A signal listing a two-factor
    // level among its own must not let the caller who tripped it in with two factors.
    let text = demo_policy_without_risk()
        .replace(r#"acr: ["urn:okta:loa:2fa:any", "phr"]"#, r#"acr: ["phr"]"#)
        + &format!("\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"] }}\n")
        + r#"
risk:
  signals:
    repeated_step_ups:
      count: step_up
      key: subject
      window: 1m
      threshold: 3
      action: step_up
      require: { acr: ["phr", "urn:okta:loa:2fa:any"] }
"#;
    let policy = TempPolicy::new("risk-acr", &text);
    let (server, admin_url) = common::serve_with_admin(&policy.path, true).await;
    let two_factor = mint(&TokenSpec {
        issuer: stepgate::demo::DEMO_OIDC_ISSUER.into(),
        subject: "mallory".into(),
        tenant: None,
        acr: Some("urn:okta:loa:2fa:any".into()),
        amr: vec!["pwd".into(), "mfa".into()],
        roles: vec!["Admin".into()],
        ..TokenSpec::default()
    });
    for round in 0..5 {
        let answer = decide(&server, &two_factor, "admin.users").await;
        assert_eq!(
            (answer.outcome(), answer.reason.as_str()),
            (Outcome::StepUp, "acr_not_accepted"),
            "round {round}: {answer:?}"
        );
        assert_eq!(answer.step_up.unwrap().acr_values, ["phr"], "round {round}");
    }
    let (count, reached) = count_of(&admin_url, &["--subject", "mallory"], "repeated_step_ups");
    assert!(count >= 3 && reached, "the signal was tripped: {count}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_step_ups_escalate_to_a_stronger_context_then_expire_with_the_window() {
    let (_policy, server, admin_url) = start("risk-step-ups", STEP_UPS).await;
    let without = entra_token("mallory", &[]);
    let with_mfa = entra_token("mallory", &["c1"]);
    for _ in 0..3 {
        let answer = decide(&server, &without, "payments.wire_transfer").await;
        assert_eq!(answer.outcome(), Outcome::StepUp, "{answer:?}");
        assert_eq!(answer.step_up.unwrap().auth_contexts, ["c1"]);
    }
    let (count, reached) = count_of(&admin_url, &["--subject", "mallory"], "repeated_step_ups");
    assert!(count >= 3 && reached, "{count}");

    // At the threshold, MFA (c1) is no longer enough for mallory: c3 is asked as well, on every
    // protected route, with the reason the missing context gives.
    let answer = decide(&server, &with_mfa, "payments.wire_transfer").await;
    assert_eq!(
        (answer.outcome(), answer.reason.as_str()),
        (Outcome::StepUp, "missing_auth_context"),
        "{answer:?}"
    );
    let step_up = answer.step_up.unwrap();
    assert_eq!(step_up.missing_auth_contexts, ["c3"]);
    assert!(step_up.auth_contexts.contains(&"c3".to_owned()));
    let answer = decide(&server, &with_mfa, "reports.read").await;
    assert_eq!(answer.outcome(), Outcome::StepUp, "{answer:?}");
    // Another subject is not affected.
    let alice = entra_token("alice", &["c1"]);
    assert_eq!(
        decide(&server, &alice, "payments.wire_transfer")
            .await
            .outcome(),
        Outcome::Allow
    );
    // With c3 mallory is through.
    let with_c3 = entra_token("mallory", &["c1", "c3"]);
    assert_eq!(
        decide(&server, &with_c3, "payments.wire_transfer")
            .await
            .outcome(),
        Outcome::Allow
    );

    // The count falls as the window slides past the step-ups (at most two windows), and the
    // step-up with it. Nothing is counted while waiting: only the admin API is asked.
    let deadline = Instant::now() + Duration::from_secs(15);
    while count_of(&admin_url, &["--subject", "mallory"], "repeated_step_ups").1 {
        assert!(Instant::now() < deadline, "the count never fell");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        decide(&server, &with_mfa, "payments.wire_transfer")
            .await
            .outcome(),
        Outcome::Allow
    );
    let metrics = server.scrape().await;
    assert!(
        metrics.lines().any(|l| l
            == "stepgate_risk_triggers_total{signal=\"repeated_step_ups\",action=\"step_up\"} 1"),
        "{metrics}"
    );
    let crossed = server
        .wait_for_log(Duration::from_secs(5), |l| l["target"] == "stepgate::risk")
        .await
        .expect("a log line when the threshold is reached");
    assert_eq!(crossed["signal"], "repeated_step_ups", "{crossed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_from_a_network_block_it_and_one_token_from_many_sources_is_blocked() {
    let risk = r#"
risk:
  signals:
    forged_tokens:
      count: invalid_token
      key: source
      ipv4_prefix: 24
      window: 1m
      threshold: 5
      action: block
      block_for: 10m
    token_replay:
      count: sources
      key: token
      window: 10m
      threshold: 3
      action: block
      block_for: 1h
"#;
    let (_policy, server, admin_url) = start("risk-blocks", risk).await;
    let valid = entra_token("bob", &[]);
    // One character in the middle of the signature changed.
    let at = valid.len() - 20;
    let swapped = if &valid[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &valid[..at], &valid[at + 1..]);
    for i in 1..=5 {
        // Written the IPv6 way (as a dual-stack proxy may) or the IPv4 way: one network.
        let source = if i % 2 == 0 {
            format!("::ffff:198.51.100.{i}")
        } else {
            format!("198.51.100.{i}")
        };
        let (status, _, reason, _) = check_from(&server, "/reports", &source, Some(&forged)).await;
        assert_eq!((status, reason.as_str()), (401, "signature_invalid"));
    }
    // The fifth forged token reached the threshold: the whole /24 is blocked, valid tokens too,
    // with the signal's name as the block's reason id, whichever way the address is written.
    for source in ["198.51.100.200", "::ffff:198.51.100.201"] {
        let (status, block, reason, _) =
            check_from(&server, "/reports", source, Some(&valid)).await;
        assert_eq!(
            (status, reason.as_str()),
            (403, "source_blocked"),
            "{source}"
        );
        assert_eq!(block.as_deref(), Some("risk.forged_tokens"));
    }
    for source in ["203.0.113.1", "::ffff:203.0.113.1", "::1"] {
        let (status, _, _, _) = check_from(&server, "/reports", source, Some(&valid)).await;
        assert_eq!(status, 200, "another network: {source}");
    }
    let listed = admin_ok(&admin_url, &["list"]);
    let block = &listed["blocks"][0];
    assert_eq!(
        (&block["kind"], &block["value"], &block["created_by"]),
        (
            &Value::from("source"),
            &Value::from("198.51.100.0/24"),
            &Value::from("risk:forged_tokens")
        ),
        "{listed}"
    );

    // One token presented from a third source address: blocked, that token only.
    let carol = entra_token("carol", &[]);
    for source in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
        let (status, _, _, _) = check_from(&server, "/reports", source, Some(&carol)).await;
        assert_eq!(status, 200);
    }
    let (status, block, reason, _) =
        check_from(&server, "/reports", "192.0.2.1", Some(&carol)).await;
    assert_eq!((status, reason.as_str()), (403, "blocked"));
    assert_eq!(block.as_deref(), Some("risk.token_replay"));
    let carol_again = mint(&TokenSpec {
        subject: "carol".into(),
        lifetime: 1800,
        ..TokenSpec::default()
    });
    let (status, _, _, _) = check_from(&server, "/reports", "192.0.2.1", Some(&carol_again)).await;
    assert_eq!(
        status, 200,
        "a new token of the same subject is not blocked"
    );
    let metrics = server.scrape().await;
    for signal in ["forged_tokens", "token_replay"] {
        let line =
            format!("stepgate_risk_triggers_total{{signal=\"{signal}\",action=\"block\"}} 1");
        assert!(metrics.lines().any(|l| l == line), "{line}\n{metrics}");
    }
    server
        .wait_for_log(Duration::from_secs(5), |l| {
            l["target"] == "stepgate::audit" && l["kind"] == "token"
        })
        .await
        .expect("the token block's audit line");
    let audit: Vec<Value> = server
        .json_logs()
        .into_iter()
        .filter(|l| l["target"] == "stepgate::audit")
        .collect();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(!server.logs_text().contains(&valid[..at]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_check_from_only_the_proxies_address_may_call_check_and_other_callers_count_nothing() {
    let risk = r#"
risk:
  signals:
    forged_tokens:
      count: invalid_token
      key: source
      window: 1m
      threshold: 2
      action: block
      block_for: 10m
"#;
    let policy = TempPolicy::new("check-from", &(demo_policy_without_risk() + risk));
    // The "proxy" connects from 127.0.0.2; every other test channel comes from 127.0.0.1.
    let server = Server::spawn_with(
        &policy.path,
        Spawn {
            args: vec!["--check-from".into(), "10.0.0.0/8,127.0.0.2".into()],
            metrics: true,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let proxy = Ipv4Addr::new(127, 0, 0, 2);
    let valid = entra_token("bob", &[]);
    let forged = format!("{}x", &valid[..valid.len() - 1]);

    // Another caller names the victim's address with forged tokens: each is refused before it
    // is read, so nothing is counted against that address.
    for _ in 0..3 {
        let (status, _, reason, _) =
            check_from(&server, "/reports", "198.51.100.7", Some(&forged)).await;
        assert_eq!((status, reason.as_str()), (403, "caller_not_allowed"));
    }
    let (status, _, reason, _) =
        check_from(&server, "/reports", "198.51.100.7", Some(&valid)).await;
    assert_eq!(
        (status, reason.as_str()),
        (403, "caller_not_allowed"),
        "a valid token from another caller is refused too"
    );
    // The same caller may still call Decide.
    let answer = decide(&server, &valid, "reports.read").await;
    assert_eq!(answer.outcome(), Outcome::Allow, "{answer:?}");

    // The proxy's Checks are decided: the address is not blocked by what came before.
    let channel = server.channel_from(proxy).await;
    let from_proxy = async |token: &str| {
        let (status, _, reason, _) =
            check_on(channel.clone(), "/reports", "198.51.100.7", Some(token)).await;
        (status, reason)
    };
    let (status, _) = from_proxy(&valid).await;
    assert_eq!(status, 200, "the refused Checks counted nothing");
    // And its own forged tokens do count: two block the address.
    for _ in 0..2 {
        let (status, reason) = from_proxy(&forged).await;
        assert_eq!(status, 401, "{reason}");
    }
    let (status, reason) = from_proxy(&valid).await;
    assert_eq!((status, reason.as_str()), (403, "source_blocked"));

    let metrics = server.scrape().await;
    let refused = "stepgate_decisions_total{door=\"check\",outcome=\"DENY\",reason=\"caller_not_allowed\",rule=\"\"} 4";
    assert!(
        metrics.lines().any(|l| l == refused),
        "{refused}\n{metrics}"
    );
    assert!(
        server
            .wait_for_text(Duration::from_secs(5), &["refused a Check: its caller"])
            .await,
        "no warning about the refused caller:\n{}",
        server.logs_text()
    );
    let warnings = server
        .json_logs()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("refused a Check"))
        })
        .collect::<Vec<_>>();
    assert_eq!(warnings.len(), 1, "one warning per 10 s: {warnings:?}");
    assert_eq!(warnings[0]["caller"], "127.0.0.1", "{warnings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_read_the_counts_and_log_signals_only_log() {
    let risk = r#"
risk:
  signals:
    denials:
      count: deny
      key: subject
      window: 10m
      threshold: 2
      action: log
"#;
    let (policy, server, admin_url) = start("risk-cel", risk).await;
    // Escalate the catch-all rule once a subject has been denied twice.
    let edited = std::fs::read_to_string(&policy.path).unwrap().replace(
        "    require: { authenticated: true }\n",
        "    require: { authenticated: true }\n    escalate:\n      - when: risk.denials >= 2\n        require: { auth_contexts: [c1] }\n",
    );
    assert_ne!(edited, std::fs::read_to_string(&policy.path).unwrap());
    policy.write(&edited);
    server.signal("HUP");
    assert!(
        server
            .wait_for_text(Duration::from_secs(10), &["policy reloaded"])
            .await,
        "{}",
        server.logs_text()
    );

    let eve = entra_token("eve", &[]);
    assert_eq!(
        decide(&server, &eve, "reports.read").await.outcome(),
        Outcome::Allow
    );
    for _ in 0..2 {
        // customers.read_pii needs a scope eve lacks.
        let answer = decide(&server, &eve, "customers.read_pii").await;
        assert_eq!(answer.reason, "missing_scope", "{answer:?}");
    }
    assert_eq!(
        count_of(&admin_url, &["--subject", "eve"], "denials"),
        (2, true)
    );
    // The signal itself only logs (shadow); the rule's escalation reads it.
    let answer = decide(&server, &eve, "reports.read").await;
    assert_eq!(
        (
            answer.outcome(),
            answer.step_up.clone().unwrap().auth_contexts
        ),
        (Outcome::StepUp, vec!["c1".to_owned()]),
        "{answer:?}"
    );
    let frank = entra_token("frank", &[]);
    assert_eq!(
        decide(&server, &frank, "reports.read").await.outcome(),
        Outcome::Allow
    );
    let metrics = server.scrape().await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "stepgate_risk_triggers_total{signal=\"denials\",action=\"log\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_distinct_sources_stays_within_max_keys() {
    let risk = r#"
risk:
  max_keys: 200
  signals:
    probes:
      count: invalid_token
      key: source
      window: 10m
      threshold: 1000
      action: log
"#;
    let (_policy, server, _admin) = start("risk-flood", risk).await;
    let channel = server.channel().await;
    let forged = "eyJhbGciOiJSUzI1NiJ9.e30.c2ln";
    for i in 0..3000u32 {
        let source = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
        let (status, _, _, _) = check_on(channel.clone(), "/reports", &source, Some(forged)).await;
        assert_eq!(status, 401);
    }
    let metrics = server.scrape().await;
    let value = |name: &str| -> i64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{signal=\"probes\"}} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
            .parse()
            .unwrap()
    };
    let (keys, max) = (value("stepgate_risk_keys"), value("stepgate_risk_keys_max"));
    assert_eq!(max, 256, "200 rounded up to a multiple of the 64 shards");
    assert!(keys > 0 && keys <= max, "{keys} keys of at most {max}");
}

#[test]
fn a_risk_section_that_does_not_compile_is_refused_with_its_field_path() {
    for (risk, path) in [
        (
            "risk:\n  signals:\n    s: { count: invalid_token, key: subject, window: 1m, threshold: 3 }\n",
            "risk.signals.s.key",
        ),
        (
            "risk:\n  signals:\n    s: { count: deny, key: subject, window: 1m, threshold: 3, action: block }\n",
            "risk.signals.s.block_for",
        ),
        ("risk:\n  store: memcached://cache:11211\n", "risk.store"),
        (
            "risk:\n  signals:\n    s: { count: deny, key: subject, window: 1m, threshold: 3, action: step_up, require: { roles: [x] } }\n",
            "risk.signals.s.require",
        ),
        (
            "risk:\n  signals:\n    s: { count: deny, key: subject, window: 1m, threshold: 3, action: step_up, require: { acr: [loa-9] } }\n",
            "risk.signals.s.require.acr",
        ),
        (
            "risk:\n  signals:\n    a: { count: deny, key: subject, window: 1m, threshold: 3, action: step_up, require: { acr: [phr] } }\n    \
             b: { count: deny, key: client_id, window: 1m, threshold: 3, action: step_up, require: { acr: [\"urn:okta:loa:2fa:any\"] } }\n",
            "risk.signals.b.require.acr",
        ),
    ] {
        let policy = TempPolicy::new("risk-bad", &(demo_policy_without_risk() + risk));
        let (code, _, stderr) = common::check_policy(&policy.path);
        assert_eq!(code, Some(2), "{risk}: {stderr}");
        assert!(stderr.contains(path), "{path} not in: {stderr}");
    }
}
