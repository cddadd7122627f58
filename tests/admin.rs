//! The admin API (`stepgate.v1.AdminService` on `--admin-listen`) against the real binary: an
//! operator blocks a subject or a source address with `stepgate admin`, and `Decide` and `Check`
//! on the main listener answer `403 blocked` / `403 source_blocked` with the block's reason id
//! (never its text) until it is lifted; callers without the right credential are refused; every
//! change is in the audit log.

mod common;
#[path = "common/envoy.rs"]
mod envoy;

use std::process::Command;

use common::{Server, TempPolicy, bin, check_from, demo_policy_text, mint, oidc};
use serde_json::Value;
use stepgate::{
    api::v1::{
        DecideRequest, ListBlocksRequest, Outcome, admin_service_client::AdminServiceClient,
        decide_request::Credential, decision_service_client::DecisionServiceClient,
    },
    demo::TokenSpec,
};
use tonic::{Code, transport::Endpoint};

const ADMIN_ROLE: &str = "stepgate.admin";

/// The demo policy; admin rights for demo-oidc tokens with the role `stepgate.admin`.
fn admin_policy() -> TempPolicy {
    TempPolicy::new("admin", &admin_policy_text())
}

fn admin_policy_text() -> String {
    demo_policy_text()
        + &format!("\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"] }}\n")
}

/// stepgate on [`admin_policy`] with an admin listener (and metrics if asked), ready: the policy
/// (kept for the server's life), the server and the admin listener's URL.
async fn start_with_admin(metrics: bool) -> (TempPolicy, Server, String) {
    let policy = admin_policy();
    let (server, admin_url) = common::serve_with_admin(&policy.path, metrics).await;
    (policy, server, admin_url)
}

/// A demo-oidc token of `subject` with `roles`.
fn token_of(subject: &str, roles: &[&str]) -> String {
    mint(&TokenSpec {
        subject: subject.to_owned(),
        ..oidc(roles, None, &[])
    })
}

/// `stepgate admin <args>` against `server`: exit code, stdout as JSON (or Null), stderr.
fn admin(server: &str, args: &[&str]) -> (Option<i32>, Value, String) {
    let out = Command::new(bin())
        .arg("admin")
        .args(args)
        .args(["--server", server])
        .output()
        .expect("running stepgate admin");
    let stdout = String::from_utf8_lossy(&out.stdout);
    (
        out.status.code(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn decide_as(server: &Server, token: &str) -> stepgate::api::v1::DecideResponse {
    DecisionServiceClient::new(server.channel().await)
        .decide(DecideRequest {
            credential: Some(Credential::Token(token.to_owned())),
            operation: "reports.read".into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner()
}

/// `admin.require` holds an admin token to a rule's requirement: the role alone does not lift a
/// block; the same operator signed in with MFA recently does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_without_the_required_sign_in_is_refused() {
    let text = demo_policy_text()
        + &format!(
            "\nadmin:\n  issuers: [demo-oidc]\n  roles: [\"{ADMIN_ROLE}\"]\n  require: {{ amr: [mfa], max_age: 15m }}\n"
        );
    let policy = TempPolicy::new("admin-require", &text);
    let (_server, admin_url) = common::serve_with_admin(&policy.path, false).await;
    let list = |token: &str| admin(&admin_url, &["list", "--bearer", token]);

    let password_only = mint(&TokenSpec {
        subject: "ops-oncall".to_owned(),
        auth_age: Some(60),
        ..oidc(&[ADMIN_ROLE], None, &["pwd"])
    });
    let (code, _, stderr) = list(&password_only);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("admin.require") && stderr.contains("authentication method mfa"),
        "the refusal says what is missing: {stderr}"
    );

    let long_ago = mint(&TokenSpec {
        subject: "ops-oncall".to_owned(),
        auth_age: Some(3600),
        ..oidc(&[ADMIN_ROLE], None, &["pwd", "mfa"])
    });
    let (code, _, stderr) = list(&long_ago);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("auth_too_old"), "{stderr}");

    let stepped_up = mint(&TokenSpec {
        subject: "ops-oncall".to_owned(),
        auth_age: Some(60),
        ..oidc(&[ADMIN_ROLE], None, &["pwd", "mfa"])
    });
    let (code, listed, stderr) = list(&stepped_up);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(listed.is_object() || listed.is_array(), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_blocks_and_unblocks_a_subject_and_a_source() {
    let (_policy, server, admin_url) = start_with_admin(true).await;
    let operator = token_of("ops-oncall", &[ADMIN_ROLE]);
    let alice = token_of("alice", &[]);
    let bob = token_of("bob", &[]);
    assert_eq!(decide_as(&server, &alice).await.outcome(), Outcome::Allow);

    let (code, block, stderr) = admin(
        &admin_url,
        &[
            "block",
            "--subject",
            "alice",
            "--reason-id",
            "INC-4711",
            "--reason",
            "account takeover reported by the user",
            "--ttl",
            "1h",
            "--bearer",
            &operator,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(block["kind"], "subject", "{block}");
    assert_eq!(block["created_by"], "token:demo-oidc/ops-oncall", "{block}");

    // Both doors answer 403 blocked for alice, with the reason id and never the reason's text.
    let answer = decide_as(&server, &alice).await;
    assert_eq!(
        (answer.outcome(), answer.http_status, answer.reason.as_str()),
        (Outcome::Deny, 403, "blocked"),
        "{answer:?}"
    );
    assert_eq!(answer.block, "INC-4711");
    assert!(!format!("{answer:?}").contains("takeover"), "{answer:?}");
    // `stepgate decide --server` prints the block's reason id too.
    let printed = Command::new(bin())
        .args(["decide", "--server", &server.url(), "--token", &alice])
        .args(["--operation", "reports.read"])
        .output()
        .expect("running stepgate decide");
    let printed: Value = serde_json::from_slice(&printed.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&printed.stderr)));
    assert_eq!(
        (&printed["reason"], &printed["block"]),
        (&Value::from("blocked"), &Value::from("INC-4711")),
        "{printed:#}"
    );
    let (status, block_id, reason, body) =
        check_from(&server, "/reports", "198.51.100.7", Some(&alice)).await;
    assert_eq!((status, reason.as_str()), (403, "blocked"), "{body}");
    assert_eq!(block_id.as_deref(), Some("INC-4711"));
    assert!(!body.contains("takeover"), "{body}");
    assert_eq!(decide_as(&server, &bob).await.outcome(), Outcome::Allow);

    // A source block answers before the token: no token needed to be refused, none helps.
    let (code, _, stderr) = admin(
        &admin_url,
        &[
            "block",
            "--source",
            "203.0.113.0/24",
            "--reason-id",
            "SCAN-9",
            "--ttl",
            "10m",
            "--bearer",
            &operator,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    for token in [None, Some(bob.as_str())] {
        let (status, block_id, reason, _) =
            check_from(&server, "/reports", "203.0.113.77", token).await;
        assert_eq!((status, reason.as_str()), (403, "source_blocked"));
        assert_eq!(block_id.as_deref(), Some("SCAN-9"));
    }
    let (status, _, _, _) = check_from(&server, "/reports", "203.0.114.1", Some(&bob)).await;
    assert_eq!(status, 200, "another network");

    let (code, listed, stderr) = admin(&admin_url, &["list", "--bearer", &operator]);
    assert_eq!(code, Some(0), "{stderr}");
    let metrics = server.scrape().await;
    assert!(
        metrics.lines().any(|l| l == "stepgate_blocks 2"),
        "{metrics}"
    );
    let targets: Vec<(String, String)> = listed["blocks"]
        .as_array()
        .expect("blocks")
        .iter()
        .map(|b| {
            (
                b["kind"].as_str().unwrap().into(),
                b["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        targets,
        [
            ("subject".to_owned(), "alice".to_owned()),
            ("source".to_owned(), "203.0.113.0/24".to_owned())
        ]
    );

    for (flag, value) in [("--subject", "alice"), ("--source", "203.0.113.9/24")] {
        let (code, removed, stderr) = admin(
            &admin_url,
            &[
                "unblock", flag, value, "--reason", "resolved", "--bearer", &operator,
            ],
        );
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(removed["removed"], true, "{flag} {value}");
    }
    assert_eq!(decide_as(&server, &alice).await.outcome(), Outcome::Allow);
    let (status, _, _, _) = check_from(&server, "/reports", "203.0.113.77", Some(&bob)).await;
    assert_eq!(status, 200);
    let metrics = server.scrape().await;
    for line in [
        "stepgate_blocks 0",
        "stepgate_admin_actions_total{action=\"block\",result=\"ok\"} 2",
        "stepgate_admin_actions_total{action=\"unblock\",result=\"ok\"} 2",
        "stepgate_admin_actions_total{action=\"list\",result=\"ok\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
    assert!(
        metrics.contains(
            "stepgate_decisions_total{door=\"decide\",outcome=\"DENY\",reason=\"blocked\""
        ),
        "{metrics}"
    );

    // The audit lines name who did what; the operator's token is not in them. (Log lines reach
    // stderr through a buffer: wait for the last one.)
    server
        .wait_for_log(std::time::Duration::from_secs(5), |l| {
            l["action"] == "unblock" && l["kind"] == "source"
        })
        .await
        .expect("the last audit line");
    let audit: Vec<Value> = server
        .json_logs()
        .into_iter()
        .filter(|l| l["target"] == "stepgate::audit")
        .collect();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|l| (l["action"].as_str().unwrap(), l["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("block", "subject"),
            ("block", "source"),
            ("unblock", "subject"),
            ("unblock", "source")
        ]
    );
    assert!(
        audit
            .iter()
            .all(|l| l["by"] == "token:demo-oidc/ops-oncall")
    );
    assert!(!server.logs_text().contains(&operator));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_the_right_credential_are_refused() {
    let (_policy, server, admin_url) = start_with_admin(false).await;
    let list = |endpoint: String, bearer: Option<String>| async move {
        let channel = Endpoint::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut request = tonic::Request::new(ListBlocksRequest {});
        if let Some(token) = bearer {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        AdminServiceClient::new(channel)
            .list_blocks(request)
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    };
    let entra_admin = mint(&TokenSpec {
        roles: vec![ADMIN_ROLE.to_owned()],
        ..TokenSpec::default()
    });
    for (what, bearer, code) in [
        ("no credential", None, Code::Unauthenticated),
        (
            "not a token",
            Some("not-a-jwt".to_owned()),
            Code::Unauthenticated,
        ),
        (
            "a valid token without the role",
            Some(token_of("alice", &["Reader"])),
            Code::PermissionDenied,
        ),
        (
            "the role from an issuer not named",
            Some(entra_admin),
            Code::PermissionDenied,
        ),
    ] {
        assert_eq!(list(admin_url.clone(), bearer).await, Err(code), "{what}");
    }
    assert_eq!(
        list(admin_url.clone(), Some(token_of("ops", &[ADMIN_ROLE]))).await,
        Ok(())
    );
    // The main listener never serves it, whatever the credential.
    assert_eq!(
        list(server.url(), Some(token_of("ops", &[ADMIN_ROLE]))).await,
        Err(Code::PermissionDenied)
    );
    // Arguments that cannot make a block are refused, saying which.
    let operator = token_of("ops", &[ADMIN_ROLE]);
    for (args, why) in [
        (
            ["--source", "example.com", "--reason-id", "X-1"],
            "neither an IP address nor a CIDR",
        ),
        (
            ["--subject", "alice", "--reason-id", "has space"],
            "reason_id",
        ),
        (
            ["--token-fingerprint", "sha256:ab", "--reason-id", "X-1"],
            "not a fingerprint",
        ),
    ] {
        let mut call = vec!["block"];
        call.extend(args);
        call.extend(["--ttl", "1m", "--bearer", &operator]);
        let (code, _, stderr) = admin(&admin_url, &call);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(
            stderr.contains("InvalidArgument") && stderr.contains(why),
            "{stderr}"
        );
    }
    // The CLI says why and exits 1.
    let (code, _, stderr) = admin(&admin_url, &["list"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("Unauthenticated") || stderr.contains("unauthenticated"),
        "{stderr}"
    );
}

#[test]
fn an_admin_section_naming_an_unknown_issuer_or_an_unread_requirement_is_refused_with_its_field() {
    for (admin, field) in [
        ("{ issuers: [nobody], roles: [x] }", "admin.issuers[0]"),
        ("{ require: { amr: [mfa] } }", "admin.require"),
        (
            "{ issuers: [demo-oidc], roles: [x], require: { claims: { dept: ops } } }",
            "admin.require.claims",
        ),
        (
            "{ issuers: [demo-oidc], roles: [x], require: { when: 'true' } }",
            "admin.require.when",
        ),
        (
            "{ issuers: [demo-oidc], roles: [x], require: { auth_contexts: [c9] } }",
            "admin.require.auth_contexts[0]",
        ),
    ] {
        let text = demo_policy_text() + &format!("\nadmin: {admin}\n");
        let policy = TempPolicy::new("admin-bad", &text);
        let (code, _, stderr) = common::check_policy(&policy.path);
        assert_eq!(code, Some(2), "{admin}: {stderr}");
        assert!(stderr.contains(field), "{admin}: {stderr}");
    }
}

/// An admin issuer accepting several tenants is refused: an administrator of any of them could
/// assign itself the admin role (in Entra, app roles of a multi-tenant API are assigned in each
/// customer's own tenant). One tenant is accepted.
#[test]
fn an_admin_issuer_of_several_tenants_is_refused() {
    let issuer = |tenants: &str| {
        format!(
            "issuers:\n  - id: entra-multi\n    \
             issuer: \"https://login.microsoftonline.com/{{tenantid}}/v2.0\"\n    \
             jwks_file: {}\n    audiences: [api://stepgate-demo]\n    challenge: entra\n    \
             {tenants}\n",
            common::jwks_path().display()
        )
    };
    for (tenants, refused) in [
        (
            "tenants: [11111111-1111-1111-1111-111111111111, 22222222-2222-2222-2222-222222222222]",
            true,
        ),
        ("any_tenant: true", true),
        ("tenants: [11111111-1111-1111-1111-111111111111]", false),
    ] {
        let text = demo_policy_text().replacen("issuers:\n", &issuer(tenants), 1)
            + "\nadmin: { issuers: [entra-multi], roles: [stepgate.admin] }\n";
        let policy = TempPolicy::new("admin-tenants", &text);
        let (code, _, stderr) = common::check_policy(&policy.path);
        if refused {
            assert_eq!(code, Some(2), "{tenants}: {stderr}");
            assert!(
                stderr.contains("admin.issuers[0]") && stderr.contains("several tenants"),
                "{tenants}: {stderr}"
            );
        } else {
            assert_eq!(code, Some(0), "{tenants}: {stderr}");
        }
    }
}

/// A demo token of `spec` whose `iat` is `iat`.
fn issued_at(spec: TokenSpec, subject: &str, iat: i64) -> String {
    let mut extra = serde_json::Map::new();
    extra.insert("iat".into(), iat.into());
    mint(&TokenSpec {
        subject: subject.to_owned(),
        extra,
        ..spec
    })
}

/// `401 invalid_token`, reason `session_revoked`: refused, nothing to step up to.
fn assert_revoked_without_a_challenge(answer: &stepgate::api::v1::DecideResponse) {
    assert_eq!(
        (answer.outcome(), answer.http_status, answer.reason.as_str()),
        (Outcome::Deny, 401, "session_revoked"),
        "{answer:?}"
    );
    assert!(
        answer.www_authenticate.contains("error=\"invalid_token\""),
        "{}",
        answer.www_authenticate
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_sessions_get_the_continuous_access_challenge_or_a_401() {
    use base64::Engine as _;
    let (_policy, server, admin_url) = start_with_admin(false).await;
    let operator = token_of("ops-oncall", &[ADMIN_ROLE]);
    let now = common::unix_now();
    let revoked_at = now - 60;
    // Tokens issued ten minutes ago: an Entra client that handles claims challenges (cp1), one
    // that does not, and a standards-based one; a token issued now; another subject's.
    let old_cp1 = issued_at(common::entra(&[], &["cp1"]), "alice", now - 600);
    let old_entra = issued_at(common::entra(&[], &[]), "alice", now - 600);
    let old_oidc = issued_at(oidc(&[], None, &[]), "alice", now - 600);
    let fresh = issued_at(common::entra(&[], &["cp1"]), "alice", now);
    let bobs = issued_at(common::entra(&[], &["cp1"]), "bob", now - 600);
    // Tokens issued now from a sign-in ten minutes ago: what refreshing the revoked session
    // gives, Entra's answer to the continuous-access challenge included.
    let signed_in_before = |spec: TokenSpec| {
        issued_at(
            TokenSpec {
                auth_age: Some(600),
                ..spec
            },
            "alice",
            now,
        )
    };
    let refreshed_cp1 = signed_in_before(common::entra(&[], &["cp1"]));
    let refreshed_oidc = signed_in_before(oidc(&[], None, &[]));
    for token in [
        &old_cp1,
        &old_entra,
        &old_oidc,
        &fresh,
        &bobs,
        &refreshed_cp1,
        &refreshed_oidc,
    ] {
        assert_eq!(decide_as(&server, token).await.outcome(), Outcome::Allow);
    }

    let (code, revocation, stderr) = admin(
        &admin_url,
        &[
            "revoke",
            "--subject",
            "alice",
            "--before",
            &revoked_at.to_string(),
            "--reason-id",
            "INC-77",
            "--reason",
            "password reset after phishing",
            "--bearer",
            &operator,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(revocation["before"], revoked_at, "{revocation}");

    // cp1: Entra's continuous-access-evaluation challenge, `nbf` at the revocation time (a string).
    let answer = decide_as(&server, &old_cp1).await;
    assert_eq!(
        (answer.outcome(), answer.http_status, answer.reason.as_str()),
        (Outcome::StepUp, 401, "session_revoked"),
        "{answer:?}"
    );
    let claims =
        format!(r#"{{"access_token":{{"nbf":{{"essential":true,"value":"{revoked_at}"}}}}}}"#);
    let encoded = base64::engine::general_purpose::STANDARD.encode(&claims);
    assert!(
        answer
            .www_authenticate
            .contains("error=\"insufficient_claims\"")
            && answer
                .www_authenticate
                .contains(&format!("claims=\"{encoded}\"")),
        "{}",
        answer.www_authenticate
    );
    assert_eq!(
        answer.step_up.as_ref().map(|s| s.claims.as_str()),
        Some(claims.as_str())
    );
    // An RFC 9470 issuer's: a step-up whose max_age asks for a sign-in since the revocation
    // (neither a refresh nor the provider's single sign-on brings a token that meets it).
    for token in [&old_oidc, &refreshed_oidc] {
        let answer = decide_as(&server, token).await;
        assert_eq!(
            (answer.outcome(), answer.http_status, answer.reason.as_str()),
            (Outcome::StepUp, 401, "session_revoked"),
            "{answer:?}"
        );
        let max_age: i64 = answer
            .www_authenticate
            .split("max_age=")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no max_age in {}", answer.www_authenticate));
        assert!(
            answer
                .www_authenticate
                .contains("error=\"insufficient_user_authentication\"")
                && (60..=90).contains(&max_age),
            "signed in since the revocation, a minute ago: {}",
            answer.www_authenticate
        );
    }
    // A machine's token of that issuer (client credentials: no `auth_time`): no user could meet
    // a max_age, so it is refused.
    let machine = issued_at(
        TokenSpec {
            auth_age: None,
            ..oidc(&[], None, &[])
        },
        "alice",
        now - 600,
    );
    // The others: 401 invalid_token, session_revoked; so are Entra tokens refreshed from the
    // revoked session (a new `iat`, the old `auth_time`): a cp1 client that met the challenge
    // with a refresh is not challenged again, which would loop.
    for token in [&old_entra, &refreshed_cp1, &machine] {
        assert_revoked_without_a_challenge(&decide_as(&server, token).await);
    }
    // A token issued after the revocation, and another subject's, go through.
    assert_eq!(decide_as(&server, &fresh).await.outcome(), Outcome::Allow);
    assert_eq!(decide_as(&server, &bobs).await.outcome(), Outcome::Allow);

    // A revocation set ahead of the clock: until then no sign-in is recent enough, so a user
    // signing in again is refused rather than asked to, again and again, with a max_age of 0.
    let ahead = now + 120;
    let (code, _, stderr) = admin(
        &admin_url,
        &[
            "revoke",
            "--subject",
            "carol",
            "--before",
            &ahead.to_string(),
            "--reason-id",
            "INC-78",
            "--bearer",
            &operator,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let carol_now = issued_at(oidc(&[], None, &[]), "carol", now);
    assert_revoked_without_a_challenge(&decide_as(&server, &carol_now).await);
    // Check answers the same.
    let (status, _, reason, _) =
        check_from(&server, "/reports", "198.51.100.7", Some(&old_oidc)).await;
    assert_eq!((status, reason.as_str()), (401, "session_revoked"));

    let (_, listed, _) = admin(&admin_url, &["list", "--bearer", &operator]);
    assert_eq!(listed["revocations"][0]["subject"], "alice", "{listed}");
    server
        .wait_for_log(std::time::Duration::from_secs(5), |l| {
            l["action"] == "revoke"
        })
        .await
        .expect("an audit line for the revocation");
}

/// Through the real Envoy: a blocked subject's request never reaches the upstream, the client
/// gets stepgate's 403, and Envoy's access log carries the block's reason id; a blocked source
/// (Envoy's own client address) is refused even without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_enforces_blocks_and_logs_their_reason_id() {
    let (_policy, server, admin_url) = start_with_admin(false).await;
    let echo = envoy::Echo::start().await;
    let proxy = envoy::Envoy::start(envoy::ENVOY_YAML, server.port, echo.port).await;
    let operator = token_of("ops-oncall", &[ADMIN_ROLE]);
    let alice = token_of("alice", &[]);
    let http = reqwest::Client::new();
    let get = |path: &'static str, token: Option<String>| {
        let mut request = http.get(proxy.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.expect("a response from Envoy");
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    };
    assert_eq!(get("/reports/before", Some(alice.clone())).await.0, 200);

    let (code, _, stderr) = admin(
        &admin_url,
        &[
            "block",
            "--subject",
            "alice",
            "--reason-id",
            "INC-5",
            "--reason",
            "stolen laptop",
            "--ttl",
            "5m",
            "--bearer",
            &operator,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let (status, body) = get("/reports/blocked", Some(alice.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("\"reason\":\"blocked\""), "{body}");
    assert!(!body.contains("stolen"), "{body}");
    assert!(echo.requests().iter().all(|r| r.path != "/reports/blocked"));
    let line = proxy
        .wait_for_access_log(std::time::Duration::from_secs(10), |l| {
            l.starts_with("GET /reports/blocked ")
        })
        .await
        .expect("an access log line");
    assert!(
        line.contains("reason=blocked") && line.ends_with("block=INC-5"),
        "{line}"
    );

    // Envoy's client is 127.0.0.1: block loopback, and even an anonymous request gets 403.
    let (code, _, stderr) = admin(
        &admin_url,
        &[
            "block",
            "--source",
            "127.0.0.0/8",
            "--reason-id",
            "LOOP-1",
            "--ttl",
            "5m",
            "--bearer",
            &operator,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let (status, body) = get("/reports/anonymous", None).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("source_blocked"), "{body}");
}

/// A single token blocked by its `jti` (or Entra `uti`): that token is refused, another token of
/// the same subject is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_is_blocked_by_its_jti_or_uti() {
    let (_policy, server, admin_url) = start_with_admin(false).await;
    let operator = token_of("ops-oncall", &[ADMIN_ROLE]);
    let with_claim = |name: &str, value: &str| {
        let mut extra = serde_json::Map::new();
        extra.insert(name.into(), value.into());
        mint(&TokenSpec {
            subject: "alice".into(),
            extra,
            ..common::entra(&[], &[])
        })
    };
    let leaked = with_claim("jti", "leaked-7f3a");
    let leaked_entra = with_claim("uti", "FVsGxYXI30-TuikuuUoFAA");
    let other = with_claim("jti", "fine-0001");
    for id in ["leaked-7f3a", "FVsGxYXI30-TuikuuUoFAA"] {
        let (code, block, stderr) = admin(
            &admin_url,
            &[
                "block",
                "--token-id",
                id,
                "--reason-id",
                "LEAK-3",
                "--ttl",
                "1h",
                "--bearer",
                &operator,
            ],
        );
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(block["kind"], "token_id", "{block}");
    }
    for token in [&leaked, &leaked_entra] {
        let answer = decide_as(&server, token).await;
        assert_eq!(
            (answer.reason.as_str(), answer.block.as_str()),
            ("blocked", "LEAK-3")
        );
    }
    assert_eq!(decide_as(&server, &other).await.outcome(), Outcome::Allow);
}

/// Entra's `sub` is pairwise: a user reaching the API through two client applications has two.
/// With `subject_claim: oid` a subject block names the user's object id and refuses the tokens
/// of every client; a block of one `sub` refuses nobody then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_subject_claim_oid_a_subject_block_holds_across_client_applications() {
    let text = admin_policy_text().replacen(
        "    challenge: entra\n",
        "    challenge: entra\n    subject_claim: oid\n",
        1,
    );
    assert_ne!(text, admin_policy_text());
    let policy = TempPolicy::new("admin-oid", &text);
    let (server, admin_url) = common::serve_with_admin(&policy.path, false).await;
    let operator = token_of("ops-oncall", &[ADMIN_ROLE]);
    let user = |sub: &str, client: &str, oid: &str| {
        let mut extra = serde_json::Map::new();
        extra.insert("oid".into(), oid.into());
        mint(&TokenSpec {
            subject: sub.into(),
            client_id: Some(client.into()),
            extra,
            ..common::entra(&[], &[])
        })
    };
    let mallory = "5b1a3f0e-9c0d-4d1e-8f7a-2c3b4d5e6f70";
    let through_portal = user("AAAApairwise-portal", "portal-app", mallory);
    let through_cli = user("AAAApairwise-cli", "cli-app", mallory);
    let someone_else = user(
        "AAAApairwise-portal-2",
        "portal-app",
        "0e6c1f4a-1111-4222-8333-944455556666",
    );
    for subject in [mallory, "AAAApairwise-cli"] {
        let (code, _, stderr) = admin(
            &admin_url,
            &[
                "block",
                "--subject",
                subject,
                "--reason-id",
                "INC-9",
                "--ttl",
                "1h",
                "--bearer",
                &operator,
            ],
        );
        assert_eq!(code, Some(0), "{stderr}");
    }
    for token in [&through_portal, &through_cli] {
        let answer = decide_as(&server, token).await;
        assert_eq!(
            (answer.reason.as_str(), answer.block.as_str()),
            ("blocked", "INC-9")
        );
    }
    assert_eq!(
        decide_as(&server, &someone_else).await.outcome(),
        Outcome::Allow
    );
    // The pairwise `sub` names nobody: its block refuses no token of the policy's.
    let (code, _, stderr) = admin(
        &admin_url,
        &["unblock", "--subject", mallory, "--bearer", &operator],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        decide_as(&server, &through_cli).await.outcome(),
        Outcome::Allow
    );
}

/// One admin call with `token` as the bearer: its status code when refused, and its message.
async fn admin_call(admin_url: &str, token: &str, call: &str) -> Result<(), (Code, String)> {
    use stepgate::api::v1::{BlockKind, BlockRequest, BlockTarget, UnblockRequest};
    let channel = Endpoint::from_shared(admin_url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AdminServiceClient::new(channel);
    fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }
    let target = |value: &str| {
        Some(BlockTarget {
            kind: BlockKind::Subject as i32,
            value: value.to_owned(),
        })
    };
    let result = match call {
        "list" => client
            .list_blocks(with_token(ListBlocksRequest {}, token))
            .await
            .map(|_| ()),
        // Lift the block on the stolen operator's own subject.
        "unblock" => client
            .unblock(with_token(
                UnblockRequest {
                    target: target("mallory"),
                    reason: "oops".into(),
                },
                token,
            ))
            .await
            .map(|_| ()),
        // Block the operator responding to the incident.
        "block" => client
            .block(with_token(
                BlockRequest {
                    target: target("soc-lead"),
                    reason_id: "X-1".into(),
                    reason: String::new(),
                    ttl_seconds: 60,
                },
                token,
            ))
            .await
            .map(|_| ()),
        other => panic!("no admin call {other}"),
    };
    result.map_err(|s| (s.code(), s.message().to_owned()))
}

/// A stolen operator's token, once its subject or its fingerprint is blocked or its subject's
/// sessions revoked, is refused by the admin API as by the decisions: it can neither list, nor
/// lift its own block, nor block the operator responding. The refusal is audited (at most one
/// line per 10 s) and counted; another operator, and another token of a subject whose other
/// token alone is blocked, go on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_or_revoked_operators_token_is_refused_by_the_admin_api() {
    let (_policy, server, admin_url) = start_with_admin(true).await;
    let now = common::unix_now();
    let soc = token_of("soc-lead", &[ADMIN_ROLE]);
    let mallory = token_of("mallory", &[ADMIN_ROLE]);
    let with_jti = |jti: &str| {
        let mut extra = serde_json::Map::new();
        extra.insert("jti".into(), jti.into());
        mint(&TokenSpec {
            subject: "trent".into(),
            extra,
            ..oidc(&[ADMIN_ROLE], None, &[])
        })
    };
    let (trent_leaked, trent_other) = (with_jti("leaked"), with_jti("other"));
    let oscar = issued_at(oidc(&[ADMIN_ROLE], None, &[]), "oscar", now - 60);
    for token in [&soc, &mallory, &trent_leaked, &trent_other, &oscar] {
        assert_eq!(admin_call(&admin_url, token, "list").await, Ok(()));
    }

    let fingerprint = stepgate::identity::fingerprint(&trent_leaked);
    for args in [
        &["block", "--subject", "mallory", "--ttl", "1h"][..],
        &["block", "--token-fingerprint", &fingerprint, "--ttl", "1h"],
        &["revoke", "--subject", "oscar"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--reason-id", "INC-9", "--bearer", &soc]);
        let (code, _, stderr) = admin(&admin_url, &args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    for (token, reason) in [
        (&mallory, "blocked"),
        (&trent_leaked, "blocked"),
        (&oscar, "session_revoked"),
    ] {
        assert_eq!(decide_as(&server, token).await.reason, reason);
    }

    for (who, token, code, says) in [
        (
            "blocked subject",
            &mallory,
            Code::PermissionDenied,
            "blocked",
        ),
        (
            "blocked fingerprint",
            &trent_leaked,
            Code::PermissionDenied,
            "blocked",
        ),
        ("revoked subject", &oscar, Code::Unauthenticated, "revoked"),
    ] {
        for call in ["list", "unblock", "block"] {
            let refused = admin_call(&admin_url, token, call).await;
            assert!(
                matches!(&refused, Err((c, message)) if *c == code && message.contains(says)),
                "{who}, {call}: {refused:?}"
            );
        }
    }
    let refusals_done = std::time::Instant::now();

    // Nothing changed: the blocks stand, the responding operator is not blocked, and works.
    assert_eq!(decide_as(&server, &mallory).await.reason, "blocked");
    assert_eq!(decide_as(&server, &soc).await.outcome(), Outcome::Allow);
    assert_eq!(admin_call(&admin_url, &soc, "list").await, Ok(()));
    assert_eq!(admin_call(&admin_url, &trent_other, "list").await, Ok(()));
    let (_, listed, _) = admin(&admin_url, &["list", "--bearer", &soc]);
    assert_eq!(
        listed["blocks"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    let metrics = server.scrape().await;
    for call in ["list", "unblock", "block"] {
        let line =
            format!("stepgate_admin_actions_total{{action=\"{call}\",result=\"refused\"}} 3");
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }

    // Audited: who was refused, why, for which call; the nine refusals of a second or two make
    // one line, and the operator's token is not in it.
    let line = server
        .wait_for_log(std::time::Duration::from_secs(5), |l| {
            l["target"] == "stepgate::audit" && l["action"] == "refused"
        })
        .await
        .expect("an audit line for the refused caller");
    assert_eq!(line["by"], "token:demo-oidc/mallory", "{line}");
    assert_eq!(
        (
            &line["call"],
            &line["why"],
            &line["kind"],
            &line["reason_id"]
        ),
        (
            &"list".into(),
            &"blocked".into(),
            &"subject".into(),
            &"INC-9".into()
        ),
        "{line}"
    );
    assert_eq!(line["unlogged"], 0, "{line}");
    if refusals_done.elapsed() < std::time::Duration::from_secs(9) {
        let refused_lines = server
            .json_logs()
            .into_iter()
            .filter(|l| l["target"] == "stepgate::audit" && l["action"] == "refused")
            .count();
        assert_eq!(refused_lines, 1, "{}", server.logs_text());
    }
    assert!(!server.logs_text().contains(&mallory));
}

/// A revocation without `--before` covers every token of the subject issued up to the second it
/// was made, that second included (a token's `iat` is in whole seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_now_covers_a_token_issued_in_the_same_second() {
    let (_policy, server, admin_url) = start_with_admin(false).await;
    let operator = token_of("ops-oncall", &[ADMIN_ROLE]);
    // Mint at the start of a second, and revoke within it.
    let subsec = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_millis();
    tokio::time::sleep(std::time::Duration::from_millis(
        u64::from(1000 - subsec) + 5,
    ))
    .await;
    let peggy = token_of("peggy", &[ADMIN_ROLE]);
    let (code, revocation, stderr) = admin(
        &admin_url,
        &[
            "revoke",
            "--subject",
            "peggy",
            "--reason-id",
            "INC-10",
            "--bearer",
            &operator,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let answer = decide_as(&server, &peggy).await;
    assert_eq!(
        (answer.http_status, answer.reason.as_str()),
        (401, "session_revoked"),
        "revoked at {}: {answer:?}",
        revocation["before"]
    );
    assert!(matches!(
        admin_call(&admin_url, &peggy, "list").await,
        Err((Code::Unauthenticated, _))
    ));
}

/// What an operator writes into a block, an unblock or a revocation cannot hold a control
/// character (it could forge or hide log lines): `INVALID_ARGUMENT`, naming the field, and
/// nothing is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_what_an_operator_writes_are_refused_naming_the_field() {
    let (_policy, _server, admin_url) = start_with_admin(false).await;
    let operator = token_of("ops-oncall", &[ADMIN_ROLE]);
    let forged = "\n2026-01-01T00:00:00.000000Z  INFO stepgate::audit: admin: block lifted";
    let with_forged = format!("mallet{forged}");
    for (args, field) in [
        (
            vec![
                "block",
                "--subject",
                &with_forged,
                "--reason-id",
                "X-1",
                "--ttl",
                "1m",
            ],
            "target.value",
        ),
        (
            vec![
                "block",
                "--tenant",
                "t\u{1b}[2K",
                "--reason-id",
                "X-1",
                "--ttl",
                "1m",
            ],
            "target.value",
        ),
        (
            vec![
                "block",
                "--client-id",
                "c",
                "--reason-id",
                "X-1",
                "--ttl",
                "1m",
                "--reason",
                &with_forged,
            ],
            "reason",
        ),
        (
            vec![
                "block",
                "--subject",
                "alice",
                "--reason-id",
                "X\n1",
                "--ttl",
                "1m",
            ],
            "reason_id",
        ),
        (vec!["unblock", "--subject", "a\u{85}b"], "target.value"),
        (
            vec!["unblock", "--subject", "alice", "--reason", "r\u{7f}"],
            "reason",
        ),
        (
            vec!["revoke", "--subject", "a\rb", "--reason-id", "X-1"],
            "subject",
        ),
        (
            vec![
                "revoke",
                "--subject",
                "alice",
                "--reason-id",
                "X-1",
                "--reason",
                "tab\there",
            ],
            "reason",
        ),
    ] {
        let mut call = args.clone();
        call.extend(["--bearer", &operator]);
        let (code, _, stderr) = admin(&admin_url, &call);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("InvalidArgument") && stderr.contains(&format!("{field}:")),
            "{args:?}: {stderr}"
        );
    }
    let (_, listed, _) = admin(&admin_url, &["list", "--bearer", &operator]);
    assert_eq!(listed["blocks"], serde_json::json!([]), "{listed}");
    assert_eq!(listed["revocations"], serde_json::json!([]), "{listed}");
}

/// In the text log format (the default), an audit line is one line whatever an operator or a
/// token's subject holds: values are escaped fields, never in the message; a newline is refused
/// at the admin API, and a subject's newline (from a verified token, reaching a risk signal's
/// line and its block's audit line) is escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_text_log_an_audit_line_stays_one_line() {
    let text = common::demo_policy_without_risk()
        + &format!(
            "risk:\n  signals:\n    denied:\n      count: deny\n      key: subject\n      \
             window: 1m\n      threshold: 1\n      action: block\n      block_for: 1m\n\
             admin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"] }}\n"
        );
    let policy = TempPolicy::new("admin-text", &text);
    let (server, admin_url) = common::serve_text_with_admin(&policy.path).await;
    let operator = token_of("ops", &[ADMIN_ROLE]);
    let forged =
        "FORGED stepgate::audit: admin: subject ceo unblocked by=\"token:demo-oidc/soc-lead\"";

    // A newline in a block's value or reason is refused; nothing is logged for it.
    let with_newline = format!("mallet\n{forged}");
    for args in [
        ["block", "--subject", &with_newline, "--reason", "r"],
        ["block", "--subject", "mallet", "--reason", &with_newline],
    ] {
        let mut call = args.to_vec();
        call.extend(["--reason-id", "X-1", "--ttl", "1m", "--bearer", &operator]);
        let (code, _, stderr) = admin(&admin_url, &call);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("InvalidArgument"), "{stderr}");
    }
    // Quotes are accepted, and escaped: they cannot forge a field of the line either.
    let quoted = "mallet\" by=\"token:demo-oidc/soc-lead";
    for args in [
        vec![
            "block",
            "--subject",
            quoted,
            "--reason-id",
            "X-1",
            "--ttl",
            "1m",
            "--reason",
            quoted,
        ],
        vec!["unblock", "--subject", quoted, "--reason", quoted],
        vec![
            "revoke",
            "--subject",
            quoted,
            "--reason-id",
            "X-1",
            "--reason",
            quoted,
        ],
    ] {
        let mut call = args.clone();
        call.extend(["--bearer", &operator]);
        let (code, _, stderr) = admin(&admin_url, &call);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
    // A verified token whose subject holds a newline, denied once: the risk signal's line and
    // its block's audit line carry the subject escaped.
    let eve = token_of(&format!("eve\n{forged}"), &[]);
    let answer = DecisionServiceClient::new(server.channel().await)
        .decide(DecideRequest {
            credential: Some(Credential::Token(eve)),
            operation: "admin.users.delete".into(),
            ..Default::default()
        })
        .await
        .expect("Decide answers")
        .into_inner();
    assert_eq!(answer.outcome(), Outcome::Deny, "{answer:?}");

    let escaped_value = r#"value="mallet\" by=\"token:demo-oidc/soc-lead""#;
    assert!(
        server
            .wait_for_text(
                std::time::Duration::from_secs(5),
                &[
                    "admin: block set",
                    "admin: block lifted",
                    "admin: sessions revoked",
                    "risk signal reached its threshold",
                    "blocked by a risk signal",
                ]
            )
            .await,
        "{}",
        server.logs_text()
    );
    let logs = server.logs();
    for line in &logs {
        assert!(
            !line.starts_with("FORGED"),
            "a forged line:\n{}",
            server.logs_text()
        );
    }
    for message in [
        "admin: block set",
        "admin: block lifted",
        "admin: sessions revoked",
    ] {
        let lines: Vec<&String> = logs.iter().filter(|l| l.contains(message)).collect();
        assert_eq!(lines.len(), 1, "{message}: {lines:?}");
        let line = lines[0];
        assert!(line.contains("stepgate::audit"), "{line}");
        assert!(line.contains(escaped_value), "{line}");
        assert!(
            line.contains(r#"reason="mallet\" by=\"token:demo-oidc/soc-lead""#),
            "{line}"
        );
        assert_eq!(line.matches(" by=\"").count(), 1, "one `by` field: {line}");
        assert!(line.contains(" by=\"token:demo-oidc/ops\""), "{line}");
    }
    for message in [
        "risk signal reached its threshold",
        "blocked by a risk signal",
    ] {
        let line = logs.iter().find(|l| l.contains(message)).expect("the line");
        assert!(line.contains(r#""eve\nFORGED stepgate::audit"#), "{line}");
    }
}

/// `admin.audiences`: an admin token must be meant for the admin API. The operator's ordinary
/// token for the protected API carries the admin role all the same (Entra's app roles are the
/// API's), and every upstream and `Decide` caller sees it: replayed to the admin listener, it is
/// refused. A policy naming an audience no admin issuer accepts is refused at load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_tokens_must_carry_an_admin_audience_when_the_policy_names_them() {
    const ADMIN_AUDIENCE: &str = "api://stepgate-admin";
    let text = demo_policy_text().replacen(
        "    audiences: [api://stepgate-demo]\n    algorithms: [RS256, ES256]\n    challenge: rfc9470",
        &format!(
            "    audiences: [api://stepgate-demo, {ADMIN_AUDIENCE}]\n    algorithms: [RS256, ES256]\n    challenge: rfc9470"
        ),
        1,
    ) + &format!(
        "\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"], audiences: [\"{ADMIN_AUDIENCE}\"] }}\n"
    );
    assert!(
        text.contains(&format!("api://stepgate-demo, {ADMIN_AUDIENCE}")),
        "{text}"
    );
    let policy = TempPolicy::new("admin-audience", &text);
    let (_server, admin_url) = common::serve_with_admin(&policy.path, false).await;
    let list = |token: &str| {
        let out = Command::new(bin())
            .args(["admin", "list", "--server", &admin_url, "--bearer", token])
            .output()
            .expect("running stepgate admin");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let api_token = mint(&TokenSpec {
        subject: "ops-oncall".into(),
        ..oidc(&[ADMIN_ROLE], None, &[])
    });
    let (code, stderr) = list(&api_token);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("admin.audiences"), "{stderr}");

    let admin_token = mint(&TokenSpec {
        subject: "ops-oncall".into(),
        audience: ADMIN_AUDIENCE.into(),
        ..oidc(&[ADMIN_ROLE], None, &[])
    });
    let (code, stderr) = list(&admin_token);
    assert_eq!(code, Some(0), "{stderr}");

    // `stepgate check` says so of a policy without them.
    let (_, stdout, _) = common::check_policy(&admin_policy().path);
    assert!(stdout.contains("set admin.audiences"), "{stdout}");
    let (_, stdout, _) = common::check_policy(&policy.path);
    assert!(!stdout.contains("set admin.audiences"));

    // An audience no admin issuer accepts could never verify: refused at load, named.
    let unknown = TempPolicy::new(
        "admin-audience-unknown",
        &(demo_policy_text()
            + &format!(
                "\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"], audiences: [api://nobody] }}\n"
            )),
    );
    let (code, _, stderr) = common::check_policy(&unknown.path);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("admin.audiences[0]"), "{stderr}");

    // The API's own audience named as the admin API's: every API token of that issuer would be
    // refused by the data plane. Loaded (an issuer of operators only is right to be so), and
    // `check` says it.
    let whole = TempPolicy::new(
        "admin-audience-whole",
        &(demo_policy_text()
            + &format!(
                "\nadmin: {{ issuers: [demo-oidc], roles: [\"{ADMIN_ROLE}\"], audiences: [{}] }}\n",
                stepgate::demo::DEMO_AUDIENCE
            )),
    );
    let (code, stdout, stderr) = common::check_policy(&whole.path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("warning: 1 issuer(s) have no audience but admin.audiences")
            && stdout.contains("  issuer demo-oidc (https://login.demo.stepgate.invalid/oidc)"),
        "{stdout}"
    );
    let (_, stdout, _) = common::check_policy(&policy.path);
    assert!(
        !stdout.contains("have no audience but admin.audiences"),
        "{stdout}"
    );
}
