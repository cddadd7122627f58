//! Policy reload on SIGHUP, against the real binary: an invalid policy is refused with its field
//! path and the old one keeps deciding; a valid changed policy takes over.

mod common;

use std::time::{Duration, Instant};

use common::{Server, Spawn, TempPolicy, WIRE_REQUIRE, demo_policy_text, edit, entra, mint};
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

/// A server of `policy` that reloads on SIGHUP alone (the file watch off, so each reload is the
/// signal's), ready, a client, and a token whose wire transfer asks for a step-up under the demo.
async fn serve_reloading_on_sighup(
    policy: &TempPolicy,
) -> (Server, DecisionServiceClient<Channel>, String) {
    let server = Server::spawn_with(
        &policy.path,
        Spawn {
            args: vec!["--watch-config".into(), "false".into()],
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let client = DecisionServiceClient::new(server.channel().await);
    (server, client, mint(&entra(&[], &["cp1"])))
}

/// The records file is opened at start: a reload turning records on takes effect at the next
/// start, and a warning says so (before, the change was taken in silence and nothing recorded).
#[tokio::test]
async fn a_reload_turning_records_on_says_they_start_at_the_next_start() {
    let original = demo_policy_text();
    assert!(original.contains("records:\n  enabled: false\n"));
    let policy = TempPolicy::new("reload-records", &original);
    let (server, _client, _token) = serve_reloading_on_sighup(&policy).await;
    policy.write(&original.replace(
        "records:\n  enabled: false\n",
        "records:\n  enabled: true\n",
    ));
    let seen = server.json_logs().len();
    hup_and_wait(&server, seen, "policy reloaded").await;
    assert!(
        server
            .wait_for_text(
                Duration::from_secs(5),
                &["decision records start when stepgate restarts"]
            )
            .await,
        "{}",
        server.logs_text()
    );
}

#[tokio::test]
async fn sighup_refuses_an_invalid_policy_keeps_the_old_one_and_applies_a_valid_change() {
    let original = demo_policy_text();
    let policy = TempPolicy::new("reload", &original);
    let (server, mut client, token) = serve_reloading_on_sighup(&policy).await;

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

/// A policy adding an issuer that then gets no keys (a wrong key source, a provider not reachable)
/// would have every replica it reaches report NOT_SERVING at once: it is refused with the
/// issuer's field path, the running policy keeps serving, and the same file is taken once the
/// keys can be loaded.
#[tokio::test]
async fn a_policy_adding_an_issuer_without_keys_is_refused_until_its_keys_load() {
    let original = demo_policy_text();
    let policy = TempPolicy::new("reload-no-keys", &original);
    let (server, mut client, token) = serve_reloading_on_sighup(&policy).await;

    let partner_keys = policy.path.with_file_name("partner-jwks.json");
    let with_partner = edit(
        &original,
        "    challenge: rfc9470\n",
        &format!(
            "    challenge: rfc9470\n  - id: partner\n    issuer: https://partner.example/\n    \
             jwks_file: {}\n    audiences: [api://stepgate-demo]\n",
            partner_keys.display()
        ),
    );
    let with_partner = edit(&with_partner, WIRE_REQUIRE, "require: { max_age: 15m }");
    policy.write(&with_partner);
    let seen = server.logs().len();
    let refused = hup_and_wait(&server, seen, "refused").await;
    assert!(
        refused.to_string().contains("issuers[2]")
            && refused.to_string().contains("no signing keys"),
        "the refusal names the issuer's field path: {refused}"
    );
    server.wait_ready().await;
    let still = wire_transfer(&mut client, &token).await;
    assert_eq!(
        (still.outcome(), still.reason.as_str()),
        (Outcome::StepUp, "missing_auth_context"),
        "the running policy keeps deciding"
    );

    // The keys appear: the same file is taken (here on SIGHUP; by itself within 30 s).
    std::fs::copy(common::jwks_path(), &partner_keys).expect("copies the demo key set");
    let seen = server.logs().len();
    hup_and_wait(&server, seen, "reloaded").await;
    server.wait_ready().await;
    let now = wire_transfer(&mut client, &token).await;
    assert_eq!(now.outcome(), Outcome::Allow, "{now:?}");
}

/// A refused reload's key loads are not the serving issuers' metrics: a candidate that points
/// a running issuer at another key set (one key where the served set has two) and adds an
/// issuer without keys leaves `stepgate_keys` and `stepgate_key_loads_total` as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_leaves_the_key_metrics_of_the_policy_served() {
    let original = demo_policy_text();
    let policy = TempPolicy::new("reload-no-keys-metrics", &original);
    let server = Server::spawn_with(
        &policy.path,
        Spawn {
            args: vec!["--watch-config".into(), "false".into()],
            metrics: true,
            ..Spawn::default()
        },
    );
    server.wait_ready().await;
    let served = server.scrape().await;
    assert!(
        served.contains("stepgate_keys{issuer=\"demo-oidc\"} 2"),
        "{served}"
    );

    let other_keys = policy.path.with_file_name("other-jwks.json");
    std::fs::write(&other_keys, OTHER_KEY_SET).unwrap();
    let candidate = edit(
        &original,
        &format!(
            "    jwks_file: {}\n    audiences: [api://stepgate-demo]\n    algorithms: [RS256, ES256]\n    challenge: rfc9470\n",
            common::jwks_path().display()
        ),
        &format!(
            "    jwks_file: {}\n    audiences: [api://stepgate-demo]\n    algorithms: [RS256, ES256]\n    challenge: rfc9470\n  - id: partner\n    issuer: https://partner.example/\n    \
             jwks_file: {}\n    audiences: [api://stepgate-demo]\n",
            other_keys.display(),
            policy.path.with_file_name("missing-jwks.json").display()
        ),
    );
    let candidate = edit(&candidate, WIRE_REQUIRE, "require: { max_age: 15m }");
    policy.write(&candidate);
    let seen = server.logs().len();
    let refused = hup_and_wait(&server, seen, "refused").await;
    assert!(refused.to_string().contains("issuers[2]"), "{refused}");
    let after = server.scrape().await;
    let series = |text: &str, issuer: &str| -> Vec<String> {
        text.lines()
            .filter(|l| {
                l.starts_with("stepgate_key") && l.contains(&format!("issuer=\"{issuer}\""))
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        series(&after, "demo-oidc"),
        series(&served, "demo-oidc"),
        "the refused candidate's load of demo-oidc shows as the served issuer's"
    );
    assert!(series(&after, "partner").is_empty(), "{after}");
    let _ = std::fs::remove_file(other_keys);
}

/// An RSA public key that is not one of the bundled demo keys (nobody here holds its private key).
const OTHER_KEY_SET: &str = r#"{"keys":[{"kty":"RSA","kid":"other-1","alg":"RS256","use":"sig","n":"u1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onLRnrq0_IzW7yWR7QkrmBL7jTKEn5u-qKhbwKfBstIs-bMY2Zkp18gnTxKLxoS2tFczGkPLPgizskuemMghRniWaoLcyehkd3qqGElvW_VDL5AaWTg0nLVkjRo9z-40RQzuVaE8AkAFmxZzow3x-VJYKdjykkJ0iT9wCS0DRTXu269V264Vf_3jvredZiKRkgwlL9xNAwxXFg0x_XFw005UWVRIkdgcKWTjpBP2dPwVZ4WWC-9aGVd-Gyn1o0CLelf4rEjGoXbAAEgAqeGUxrcIlbjXfbcmw","e":"AQAB"}]}"#;

/// `stepgate serve` of `policy` on 0.0.0.0 (beyond loopback), its stderr read line by line.
struct Exposed {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: String,
}

impl Exposed {
    fn start(policy: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(common::bin())
            .args(["serve", "--config"])
            .arg(policy)
            .args(["--listen", "0.0.0.0:0", "--watch-config", "false"])
            .env_remove("RUST_LOG")
            .env_remove("STEPGATE_ALLOW_DEMO_KEYS")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting stepgate serve");
        let (sender, lines) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Waits (20 s at most) until the log holds `wanted`.
    fn wait_for(&mut self, wanted: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log.contains(wanted) {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => self.log.push_str(&(line + "\n")),
                Err(_) => assert!(Instant::now() < deadline, "no {wanted:?} in:\n{}", self.log),
            }
        }
    }

    fn hangup(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Exposed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Served beyond loopback without `--allow-demo-keys`, a reload to a policy trusting the bundled
/// demo keys (whose private halves are published) is refused, as starting with one would be.
#[test]
fn a_reload_to_the_demo_keys_beyond_loopback_is_refused() {
    let policy = TempPolicy::new("reload-demo-keys", &demo_policy_text());
    let other_keys = policy.path.with_file_name("other-jwks.json");
    std::fs::write(&other_keys, OTHER_KEY_SET).unwrap();
    policy.write(&demo_policy_text().replace(
        &format!("jwks_file: {}", common::jwks_path().display()),
        &format!("jwks_file: {}", other_keys.display()),
    ));
    let mut server = Exposed::start(&policy.path);
    server.wait_for("stepgate listening on");
    policy.write(&demo_policy_text());
    server.hangup();
    server.wait_for("policy reload refused");
    assert!(
        server.log.contains("--allow-demo-keys") && server.log.contains("issuers[0]"),
        "the refusal names the issuer and the way out:\n{}",
        server.log
    );
}

/// Demo keys arriving after the start (here a key file that appears, read again on SIGHUP; a
/// refresh or an unknown-`kid` fetch take the same way) are refused beyond loopback too.
#[test]
fn demo_keys_arriving_after_the_start_are_refused_beyond_loopback() {
    let policy = TempPolicy::new("late-demo-keys", &demo_policy_text());
    let late_keys = policy.path.with_file_name("late-jwks.json");
    policy.write(&demo_policy_text().replace(
        &format!("jwks_file: {}", common::jwks_path().display()),
        &format!("jwks_file: {}", late_keys.display()),
    ));
    let mut server = Exposed::start(&policy.path);
    server.wait_for("stepgate listening on");
    std::fs::copy(common::jwks_path(), &late_keys).unwrap();
    server.hangup();
    server.wait_for("not trusted while serving on 0.0.0.0");
    server.wait_for("policy reloaded");
    assert!(
        !server.log.contains("loaded signing keys"),
        "no key set was installed:\n{}",
        server.log
    );
}

/// A folder laid out as Kubernetes mounts a ConfigMap: `policy.yaml` → `..data/policy.yaml`,
/// `..data` → `..<version>`; an update writes a new version folder and swaps `..data` to it with
/// one rename, as the kubelet does, then removes the old version.
struct ConfigMapFolder {
    dir: std::path::PathBuf,
    version: usize,
}

impl ConfigMapFolder {
    fn new(text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "stepgate-configmap-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut folder = Self { dir, version: 0 };
        folder.update(text);
        std::os::unix::fs::symlink("..data/policy.yaml", folder.path()).unwrap();
        folder
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.join("policy.yaml")
    }

    fn update(&mut self, text: &str) {
        let old = format!("..v{}", self.version);
        self.version += 1;
        let new = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        std::fs::write(self.dir.join(&new).join("policy.yaml"), text).unwrap();
        std::os::unix::fs::symlink(&new, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

impl Drop for ConfigMapFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configmap_update_reloads_under_load_without_a_failed_call_and_a_broken_one_is_refused() {
    let original = demo_policy_text();
    let mut folder = ConfigMapFolder::new(&original);
    let server = Server::start(&folder.path()).await;
    let channel = server.channel().await;
    let token = mint(&entra(&["c1"], &["cp1"]));

    // Load: Decide calls back to back on four tasks until told to stop; every answer counted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (channel, token, stop) = (channel.clone(), token.clone(), std::sync::Arc::clone(&stop));
        load.spawn(async move {
            let mut client = DecisionServiceClient::new(channel);
            let (mut answered, mut failed) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client
                    .decide(DecideRequest {
                        credential: Some(Credential::Token(token.clone())),
                        operation: "payments.wire_transfer".into(),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(_) => answered += 1,
                    Err(status) => failed.push(status.to_string()),
                }
            }
            (answered, failed)
        });
    }
    let mut client = DecisionServiceClient::new(channel.clone());
    assert_eq!(
        wire_transfer(&mut client, &token).await.outcome(),
        Outcome::Allow
    );

    // A valid update: wire transfers now need c2 too. No signal: the swap alone reloads.
    folder.update(&edit(
        &original,
        WIRE_REQUIRE,
        "require: { auth_contexts: [c1, c2], max_age: 15m }",
    ));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = wire_transfer(&mut client, &token).await;
        if now.outcome() == Outcome::StepUp {
            assert_eq!(now.step_up.unwrap().missing_auth_contexts, ["c2"]);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ConfigMap update was not applied within 15 s:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken update: refused with its field path, and the policy in force keeps deciding.
    folder.update(&edit(
        &original,
        WIRE_REQUIRE,
        "require: { auth_contexts: [c1], max_age: fifteen }",
    ));
    assert!(
        server
            .wait_for_text(
                Duration::from_secs(15),
                &[
                    "policy reload refused",
                    "rules[1].require.max_age",
                    "the file changed"
                ]
            )
            .await,
        "the broken update was not refused:\n{}",
        server.logs_text()
    );
    let still = wire_transfer(&mut client, &token).await;
    assert_eq!(still.outcome(), Outcome::StepUp, "{still:?}");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut answered, mut failed) = (0, Vec::new());
    while let Some(done) = load.join_next().await {
        let (a, f) = done.unwrap();
        answered += a;
        failed.extend(f);
    }
    assert!(answered > 100, "only {answered} calls under load");
    assert!(
        failed.is_empty(),
        "{} calls failed during the reloads: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

/// Something that is not a regular file put in the policy's place (a FIFO here, standing in for
/// a read that never returns) is refused without being read: new connections are still served,
/// the policy in force keeps deciding, and a valid policy renamed over it afterwards is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_in_the_policys_place_is_refused_unread_and_the_server_keeps_serving() {
    let original = demo_policy_text();
    let policy = TempPolicy::new("reload-fifo", &original);
    let server = Server::start(&policy.path).await;
    let token = mint(&entra(&["c1"], &["cp1"]));

    let fifo = policy.path.with_file_name("fifo.yaml");
    let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path and a mode; mkfifo reads nothing else.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    std::fs::rename(&fifo, &policy.path).unwrap();
    server.signal("HUP");
    assert!(
        server
            .wait_for_text(Duration::from_secs(10), &["not a regular file"])
            .await,
        "the FIFO was not refused:\n{}",
        server.logs_text()
    );
    // New connections, after the watch and the reload have looked at the FIFO.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for _ in 0..3 {
        let mut client = DecisionServiceClient::new(server.channel().await);
        assert_eq!(
            wire_transfer(&mut client, &token).await.outcome(),
            Outcome::Allow
        );
    }

    // A valid policy renamed over the FIFO is applied.
    let next = policy.path.with_file_name("next.yaml");
    std::fs::write(
        &next,
        edit(
            &original,
            WIRE_REQUIRE,
            "require: { auth_contexts: [c1, c2], max_age: 15m }",
        ),
    )
    .unwrap();
    std::fs::rename(&next, &policy.path).unwrap();
    let mut client = DecisionServiceClient::new(server.channel().await);
    let deadline = Instant::now() + Duration::from_secs(15);
    while wire_transfer(&mut client, &token).await.outcome() != Outcome::StepUp {
        assert!(
            Instant::now() < deadline,
            "the valid policy was not applied within 15 s:\n{}",
            server.logs_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
