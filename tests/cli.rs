//! The `stepgate` command line, run as a child process: `check`, `serve` with a bad policy,
//! `token`, and `decide` offline and against a live server.

mod common;

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{Server, TempPolicy, WIRE_REQUIRE, bin, demo_policy_path, demo_policy_text, edit};

fn stepgate(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(common::manifest_dir())
        .env_remove("STEPGATE_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("running the stepgate binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Rule ids of a policy file, read from the YAML itself (so the test follows the demo policy).
fn rule_ids(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    yaml["rules"]
        .as_sequence()
        .expect("rules is a list")
        .iter()
        .map(|r| r["id"].as_str().expect("rule id").to_owned())
        .collect()
}

fn mint_cli(extra: &[&str]) -> String {
    let mut args = vec!["token"];
    args.extend_from_slice(extra);
    let out = stepgate(&args);
    assert!(out.status.success(), "stepgate token: {}", describe(&out));
    let token = text(&out.stdout).trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "not a compact JWS: {token:?}");
    token
}

fn decide_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["decide"];
    all.extend_from_slice(args);
    let out = stepgate(&all);
    assert!(out.status.success(), "stepgate decide: {}", describe(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("decide printed no JSON ({e}): {}", describe(&out)))
}

fn offline(token: &str, operation: &str) -> serde_json::Value {
    let config = demo_policy_path();
    decide_json(&[
        "--config",
        config.to_str().unwrap(),
        "--token",
        token,
        "--operation",
        operation,
    ])
}

/// The annotated reference in docs/policy.md ("The policy file") is a policy `check` accepts,
/// every key as documented: a reader copying it gets a working file.
#[test]
fn the_reference_policy_in_the_docs_is_accepted() {
    let doc = std::fs::read_to_string(common::manifest_dir().join("docs/policy.md")).unwrap();
    let reference = doc
        .split_once("## The policy file")
        .and_then(|(_, rest)| rest.split_once("```yaml\n"))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(yaml, _)| yaml)
        .expect("docs/policy.md has the reference policy in a yaml block");
    let policy = TempPolicy::new("docs-reference", reference);
    let out = stepgate(&["check", "--config", policy.path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

/// `check`'s output lands in CI logs: a credential in a key set's URL is masked there, as in the
/// server's log.
#[test]
fn check_masks_a_credential_in_a_key_set_url() {
    let text = "issuers:\n  - id: a\n    issuer: https://idp.example\n    \
                jwks_uri: https://svc:Sup3rSecret@idp.example/keys?api_key=K3Y\n    \
                audiences: [api]\nrules:\n  - id: all\n    match: { path: \"/**\" }\n";
    let policy = TempPolicy::new("masked-uri", text);
    let out = stepgate(&["check", "--config", policy.path.to_str().unwrap()]);
    let shown = describe(&out);
    assert_eq!(out.status.code(), Some(0), "{shown}");
    assert!(
        shown.contains("jwks_uri https://***@idp.example/keys?api_key=***"),
        "{shown}"
    );
    assert!(
        !shown.contains("Sup3rSecret") && !shown.contains("K3Y"),
        "{shown}"
    );
}

#[test]
fn check_accepts_the_demo_policy_and_prints_every_rule() {
    let path = demo_policy_path();
    let out = stepgate(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let ids = rule_ids(&path);
    assert!(
        ids.len() >= 5,
        "the demo policy has its five rules: {ids:?}"
    );
    for id in &ids {
        assert!(
            stdout.contains(id.as_str()),
            "rule {id} not printed:\n{stdout}"
        );
    }
    assert!(stdout.contains("policy OK"), "{stdout}");
    // A GET matcher takes HEAD too, and says so.
    assert!(stdout.contains("GET,HEAD"), "{stdout}");
    // The rule index's shape: every matcher of the demo is filed by operation or path.
    let matchers = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("match "))
        .count();
    let index = stdout
        .lines()
        .find(|l| l.starts_with("rule index: "))
        .unwrap_or_else(|| panic!("no rule index line:\n{stdout}"));
    assert!(
        index.contains(&format!("{matchers} matcher(s)"))
            && index.contains("0 tried on every request"),
        "{index} (the demo has {matchers} matchers)"
    );
}

/// The demo policy with `rules` (YAML, indented as rules are) before its last rule, which takes
/// every path (matchers after it would be warned of as unreachable).
fn demo_with_rules(rules: &str) -> String {
    edit(
        &demo_policy_text(),
        "  - id: everything-else",
        &format!(
            "{}\n  - id: everything-else",
            rules.trim_start_matches('\n')
        ),
    )
}

/// `stepgate check` of `policy_text` (which must pass): the warning that starts with `header`
/// and its lines (none when it is not there).
/// What `stepgate check` prints of `policy_text`, which it accepts.
fn check_stdout(name: &str, policy_text: &str) -> String {
    let policy = TempPolicy::new(name, policy_text);
    let out = stepgate(&["check", "--config", policy.path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    text(&out.stdout)
}

fn check_warning(name: &str, policy_text: &str, header: &str) -> Vec<String> {
    let stdout = check_stdout(name, policy_text);
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with(header));
    let Some(first) = lines.next() else {
        return Vec::new();
    };
    std::iter::once(first)
        .chain(lines.take_while(|l| l.starts_with("  rule ")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_warns_of_a_matcher_a_rule_above_takes_every_request_of() {
    // Added to the demo's rules: a HEAD rule below the demo's GET /healthz (a GET matcher
    // takes HEAD too), a path the wire-transfer rule's POST already takes on any host, and two
    // that nothing above takes whole (another path; a rule above with a condition).
    let added = r#"
  - id: conditional
    match: { methods: [DELETE], path: "/orders/**", when: 'request.host == "a.example"' }
    require: { scopes: [orders.delete] }
  - id: head-health
    match: { methods: [HEAD], path: /healthz }
    allow_anonymous: true
  - id: wire-again
    match:
      - { methods: [POST], path: /payments/wire, hosts: [api.example.com] }
      - { methods: [POST], path: /payments/other }
    require: { scopes: [payments] }
  - id: after-a-condition
    match: { methods: [DELETE], path: "/orders/**" }
    require: { scopes: [orders.delete] }
"#;
    let warnings = check_warning("unreachable", &demo_with_rules(added), "warning: ");
    assert_eq!(
        warnings.first().map(String::as_str),
        Some("warning: 2 matcher(s) no request reaches (first match wins):"),
        "{warnings:#?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("head-health match 1") && w.contains("rule 1. health match 1")),
        "{warnings:#?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("wire-again match 1") && w.contains("wire-transfer match 2")),
        "{warnings:#?}"
    );
    for not_taken in ["wire-again match 2", "after-a-condition", "conditional"] {
        assert!(
            !warnings.iter().any(|w| w.contains(not_taken)),
            "{not_taken}: {warnings:#?}"
        );
    }
    // The demo policy itself has none.
    let demo_check = stepgate(&["check", "--config", demo_policy_path().to_str().unwrap()]);
    assert!(
        !text(&demo_check.stdout).contains("warning:"),
        "{}",
        describe(&demo_check)
    );
}

#[test]
fn check_warns_of_an_entra_issuer_left_at_rfc9470_when_rules_require_contexts() {
    // The demo's OIDC issuer moved to an Entra ID address, its challenge left at rfc9470.
    let policy = edit(
        &demo_policy_text(),
        "issuer: https://login.demo.stepgate.invalid/oidc",
        "issuer: https://login.microsoftonline.com/00000000-0000-0000-0000-000000000001/v2.0",
    );
    let policy = TempPolicy::new("entra-as-rfc9470", &policy);
    let out = stepgate(&["check", "--config", policy.path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = text(&out.stdout);
    let warning = stdout
        .lines()
        .skip_while(|l| !l.contains("look like Entra ID"))
        .take(2)
        .collect::<Vec<_>>();
    assert!(
        warning
            .first()
            .is_some_and(|l| l.starts_with("warning: 1 issuer(s)")),
        "{stdout}"
    );
    assert!(
        warning
            .get(1)
            .is_some_and(|l| l.trim_start().starts_with("issuer demo-oidc (")),
        "{stdout}"
    );
}

#[test]
fn check_warns_of_an_entra_issuer_naming_pairwise_subjects_to_a_subject_signal() {
    // The demo's Entra issuer at an Entra ID address; the demo counts step-ups per subject.
    let entra = edit(
        &demo_policy_text(),
        "issuer: https://login.demo.stepgate.invalid/entra/v2.0",
        "issuer: https://login.microsoftonline.com/00000000-0000-0000-0000-000000000001/v2.0",
    );
    assert!(entra.contains("key: subject"));
    let header = "warning: 1 issuer(s) look like Entra ID and name the subject by sub";
    let stdout = check_stdout("entra-sub", &entra);
    let warning: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with(header))
        .take(2)
        .collect();
    assert_eq!(warning.len(), 2, "{stdout}");
    assert!(
        warning[1].trim_start().starts_with("issuer demo-entra ("),
        "{stdout}"
    );
    assert!(stdout.contains(" challenge=entra subject=sub "), "{stdout}");
    // Named by its object id: no warning, and the issuer line says so.
    let by_oid = edit(
        &entra,
        "    challenge: entra\n",
        "    challenge: entra\n    subject_claim: oid\n",
    );
    let stdout = check_stdout("entra-oid", &by_oid);
    assert!(!stdout.contains("name the subject by sub"), "{stdout}");
    assert!(stdout.contains(" challenge=entra subject=oid "), "{stdout}");
}

#[test]
fn check_warns_of_a_condition_comparing_the_path_with_upper_case_letters() {
    let added = r#"
  - id: exports
    match: { path: "/reports/**", when: 'request.path in ["/reports/a", "/reports/Q4"]' }
    require:
      scopes: [reports.read]
      when: 'request.path.startsWith("/reports/" + claims.sub) || request.path == "/reports/Public"'
    escalate:
      - when: 'request.path.lowerAscii().endsWith("/Export")'
        require: { auth_contexts: [c1] }
      - when: 'request.path.lowerAscii().endsWith("/export") || request["path"] != "/reports/x"'
        require: { auth_contexts: [c1] }
"#;
    let warnings = check_warning(
        "path-case",
        &demo_with_rules(added),
        "warning: 3 condition(s) compare request.path",
    );
    let expected = [
        "warning: 3 condition(s) compare request.path with upper-case letters (rules also read the path in lower case; docs/policy.md, \"Two readings of a request\"):",
        "  rule 6. exports match 1 when: compares request.path with \"/reports/Q4\"; compare in one case: request.path.lowerAscii() with \"/reports/q4\"",
        "  rule 6. exports require when: compares request.path with \"/reports/Public\"; compare in one case: request.path.lowerAscii() with \"/reports/public\"",
        "  rule 6. exports escalate 1 when: compares request.path.lowerAscii() with \"/Export\", which it can never equal or contain; write \"/export\"",
    ];
    assert_eq!(warnings, expected);
}

#[test]
fn check_warns_of_upper_case_globs_while_the_upstreams_reading_of_case_is_not_declared() {
    let with_home = demo_with_rules(
        "  - id: home\n    match: { paths: [\"/Home/**\", /about] }\n    allow_anonymous: true",
    );
    let header =
        "warning: 1 path glob(s) have upper-case letters while upstream.path_case is either";
    assert_eq!(
        check_warning("upper-glob", &with_home, header),
        [
            "warning: 1 path glob(s) have upper-case letters while upstream.path_case is either: a request in another case is refused (ambiguous_path); set path_case to how the upstream routes (docs/policy.md):",
            "  rule 6. home match 1 path /Home/**",
        ]
    );
    // Declared, there is nothing to warn of.
    let declared = edit(
        &with_home,
        "upstream:\n",
        "upstream:\n  path_case: insensitive\n",
    );
    assert!(check_warning("upper-glob-declared", &declared, header).is_empty());
}

#[test]
fn check_names_the_escapes_its_globs_refuse_and_warns_of_a_plus_beside_a_space() {
    let header = "paths refused for what the policy spells";
    let spelled = |stdout: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(header))
            .map(str::to_owned)
    };
    let with_verbs = demo_with_rules(
        "  - id: search\n    match: { paths: [\"/v1/*:search\", \"/c++/**\"] }\n    allow_anonymous: true",
    );
    let line = spelled(&check_stdout("spelled", &with_verbs))
        .expect("the characters the globs spell are named");
    assert!(
        line.contains("%3A (:)") && line.contains("%2B (+)") && !line.contains("spells a space"),
        "{line}"
    );
    let plus_warning = "warning: 1 path glob(s) spell a + while the policy spells a space";
    assert!(check_warning("spelled-no-space", &with_verbs, plus_warning).is_empty());
    // A glob with a space: a + in a path is refused, and the glob with a + matches nothing.
    let with_space = edit(
        &with_verbs,
        "\"/c++/**\"]",
        "\"/c++/**\", \"/files/my%20file\"]",
    );
    let line = spelled(&check_stdout("spelled-space", &with_space)).unwrap();
    assert!(line.ends_with("+ (the policy spells a space)"), "{line}");
    let warning = check_warning("spelled-space-warning", &with_space, plus_warning);
    assert_eq!(warning.len(), 2, "{warning:#?}");
    assert!(
        warning[1].ends_with("search match 1 path /c++/**"),
        "{warning:#?}"
    );
}

#[test]
fn check_warns_of_globs_naming_an_extension_while_the_upstreams_reading_is_not_declared() {
    let with_assets = demo_with_rules(
        "  - id: assets\n    match: { paths: [\"/assets/*.js\", /.well-known/**, /reports/q4.*] }\n    allow_anonymous: true",
    );
    let header = "warning: 1 path glob(s) name an extension while upstream.format_suffix is either";
    assert_eq!(
        check_warning("extension-glob", &with_assets, header),
        [
            "warning: 1 path glob(s) name an extension while upstream.format_suffix is either: a path they match is also read without its extension, as Rails and Spring MVC up to 5.2 route it, and refused (ambiguous_path) when that picks another rule; set format_suffix: exact if the upstream routes the path as sent, or match both (/a and /a.*) (docs/policy.md):",
            "  rule 6. assets match 1 path /assets/*.js",
        ]
    );
    let declared = edit(
        &with_assets,
        "upstream:\n",
        "upstream:\n  format_suffix: exact\n",
    );
    assert!(check_warning("extension-glob-declared", &declared, header).is_empty());
}

#[test]
fn check_warns_of_matchers_taking_head_and_not_get() {
    let with_probe = demo_with_rules(
        "  - id: probe\n    match: [{ methods: [HEAD], path: /reports/** }, { methods: [GET, HEAD], path: /a }]\n    allow_anonymous: true",
    );
    let header = "warning: 1 matcher(s) take HEAD and not GET";
    assert_eq!(
        check_warning("head-only", &with_probe, header),
        [
            "warning: 1 matcher(s) take HEAD and not GET: most servers answer a HEAD with their GET handler, so a HEAD is decided as a GET too and the stricter answer stands, and one that two rules take as a HEAD and as a GET, one asking a step-up, is refused (ambiguous_path) unless both allow it; match GET, which takes HEAD (docs/policy.md):",
            "  rule 6. probe match 1",
        ]
    );
    assert!(check_warning("no-head-only", &demo_with_rules(""), header).is_empty());
}

/// (name, edit of the wire-transfer rule, field path the error must name, a word it must mention)
const BAD_POLICIES: [(&str, &str, &str, &str); 4] = [
    (
        "unknown-key",
        "requires: { auth_contexts: [c1], max_age: 15m }",
        "rules[1]",
        "requires",
    ),
    (
        "bad-duration",
        "require: { auth_contexts: [c1], max_age: fifteen }",
        "rules[1].require.max_age",
        "fifteen",
    ),
    (
        "undeclared-context",
        "require: { auth_contexts: [c7], max_age: 15m }",
        "rules[1].require.auth_contexts[0]",
        "c7",
    ),
    // Deeper than CEL's parser can take on a thread's stack: refused, not a crash.
    (
        "deep-condition",
        "require: { auth_contexts: [c1], when: '((((((((((((((((((((((((((((((((((((((((true))))))))))))))))))))))))))))))))))))))' }",
        "rules[1].require.when",
        "nested 40 levels deep",
    ),
];

#[test]
fn check_rejects_bad_policies_with_exit_code_2_and_the_field_path() {
    for (name, replacement, field, word) in BAD_POLICIES {
        let policy = TempPolicy::new(name, &edit(&demo_policy_text(), WIRE_REQUIRE, replacement));
        let out = stepgate(&["check", "--config", policy.path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(field),
            "{name}: stderr lacks {field}:\n{stderr}"
        );
        assert!(
            stderr.contains(word),
            "{name}: stderr lacks {word}:\n{stderr}"
        );
        assert!(
            !text(&out.stdout).contains("policy OK"),
            "{name}: {}",
            describe(&out)
        );
    }
}

#[test]
fn check_of_a_missing_file_exits_2() {
    let out = stepgate(&["check", "--config", "/nonexistent/stepgate-policy.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(text(&out.stderr).contains("/nonexistent/stepgate-policy.yaml"));
}

#[test]
fn serve_with_a_bad_policy_exits_2_and_names_the_field() {
    for (name, replacement, field, _) in BAD_POLICIES {
        let policy = TempPolicy::new(name, &edit(&demo_policy_text(), WIRE_REQUIRE, replacement));
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(&policy.path)
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting stepgate serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{name}: stepgate serve with an invalid policy kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output().unwrap();
        assert_eq!(status.code(), Some(2), "{name}: {}", describe(&out));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(field),
            "{name}: stderr lacks {field}:\n{stderr}"
        );
    }
}

/// `stepgate serve` on `listen` with the demo policy and `extra` arguments: its exit status when
/// it exits (`None`: it said it listens, and was then stopped) and its stderr until then.
fn serve_demo_on(listen: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(demo_policy_path())
        .args(["--listen", listen])
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("STEPGATE_ALLOW_DEMO_KEYS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting stepgate serve");
    let stderr = child.stderr.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    loop {
        while let Ok(line) = received.try_recv() {
            text.push_str(&line);
            text.push('\n');
        }
        if text.contains("stepgate listening on") {
            let _ = child.kill();
            let _ = child.wait();
            return (None, text);
        }
        if let Some(status) = child.try_wait().unwrap() {
            std::thread::sleep(Duration::from_millis(100));
            text.extend(received.try_iter().map(|line| line + "\n"));
            return (status.code(), text);
        }
        assert!(
            Instant::now() < deadline,
            "stepgate serve neither listened nor exited:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The demo policy trusts keys whose private halves ship with stepgate: served beyond loopback,
/// anyone could mint the tokens it accepts, so that takes saying so (as the container's demo
/// command does).
#[test]
fn the_demo_keys_are_served_beyond_loopback_only_when_allowed() {
    let (status, stderr) = serve_demo_on("0.0.0.0:0", &[]);
    assert!(
        matches!(status, Some(code) if code != 0),
        "{status:?}\n{stderr}"
    );
    assert!(
        stderr.contains("demo-entra, demo-oidc") && stderr.contains("--allow-demo-keys"),
        "{stderr}"
    );
    assert!(!stderr.contains("stepgate listening on"), "{stderr}");
    for (listen, extra) in [
        ("0.0.0.0:0", &["--allow-demo-keys"][..]),
        ("127.0.0.1:0", &[]),
    ] {
        let (status, stderr) = serve_demo_on(listen, extra);
        assert_eq!(status, None, "{listen} {extra:?} did not serve:\n{stderr}");
        assert!(
            stderr.contains("stepgate listening on") && stderr.contains("DEMO KEY IN USE"),
            "{listen} {extra:?}: {stderr}"
        );
    }
}

#[test]
fn token_and_offline_decide_give_step_up_then_allow_for_a_wire_transfer() {
    let without_c1 = mint_cli(&["--xms-cc", "cp1"]);
    let step_up = offline(&without_c1, "payments.wire_transfer");
    assert_eq!(step_up["outcome"], "STEP_UP", "{step_up:#}");
    assert_eq!(step_up["rule"], "wire-transfer");
    assert_eq!(step_up["http_status"], 401);
    assert!(
        step_up["www_authenticate"]
            .as_str()
            .is_some_and(|w| w.contains("insufficient_claims")),
        "{step_up:#}"
    );
    assert_eq!(step_up["step_up"]["missing_auth_contexts"][0], "c1");

    let with_c1 = mint_cli(&["--xms-cc", "cp1", "--acrs", "c1"]);
    let allow = offline(&with_c1, "payments.wire_transfer");
    assert_eq!(allow["outcome"], "ALLOW", "{allow:#}");
    assert_eq!(allow["identity_headers"]["x-stepgate-auth-contexts"], "c1");

    let not_capable = mint_cli(&[]);
    let deny = offline(&not_capable, "payments.wire_transfer");
    assert_eq!(deny["outcome"], "DENY", "{deny:#}");
    assert_eq!(deny["reason"], "client_not_capable");

    let old_sign_in = mint_cli(&["--xms-cc", "cp1", "--acrs", "c1", "--auth-age", "20m"]);
    let too_old = offline(&old_sign_in, "payments.wire_transfer");
    assert_eq!(too_old["outcome"], "STEP_UP", "{too_old:#}");
    assert_eq!(too_old["reason"], "auth_too_old");
}

#[test]
fn offline_decide_with_explain_prints_the_steps() {
    let token = mint_cli(&["--issuer", "oidc", "--roles", "Admin"]);
    let config = demo_policy_path();
    let out = decide_json(&[
        "--config",
        config.to_str().unwrap(),
        "--token",
        &token,
        "--operation",
        "admin.users",
        "--explain",
    ]);
    assert_eq!(out["outcome"], "STEP_UP", "{out:#}");
    assert_eq!(out["rule"], "admin");
    let stages: Vec<&str> = out["explain"]
        .as_array()
        .expect("explain steps")
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    assert!(
        stages.contains(&"match") && stages.contains(&"challenge"),
        "{stages:?}"
    );
}

#[tokio::test]
async fn decide_against_a_live_server_matches_offline() {
    let server = Server::start(&demo_policy_path()).await;
    let url = server.url();
    let cases = [
        (
            mint_cli(&["--xms-cc", "cp1"]),
            "payments.wire_transfer",
            "STEP_UP",
        ),
        (
            mint_cli(&["--xms-cc", "cp1", "--acrs", "c1"]),
            "payments.wire_transfer",
            "ALLOW",
        ),
        (mint_cli(&[]), "payments.wire_transfer", "DENY"),
        (
            mint_cli(&["--issuer", "oidc", "--roles", "Admin"]),
            "admin.users",
            "STEP_UP",
        ),
        (
            mint_cli(&["--claim", "exp=1000000000"]),
            "accounts.list",
            "DENY",
        ),
        // Decided by the catch-all, with the demo's shadow rule on customer records beside it.
        (
            mint_cli(&["--xms-cc", "cp1", "--acrs", "c1"]),
            "customers.list",
            "ALLOW",
        ),
    ];
    for (token, operation, expected) in &cases {
        let local = offline(token, operation);
        let live = decide_json(&["--server", &url, "--token", token, "--operation", operation]);
        assert_eq!(live["outcome"], *expected, "{operation}: {live:#}");
        if *operation == "customers.list" {
            assert_eq!(
                live["shadow"][0]["rule"], "customer-data-strict",
                "the shadow rule is printed: {live:#}"
            );
        }
        for field in [
            "outcome",
            "rule",
            "reason",
            "http_status",
            "www_authenticate",
            "identity_headers",
            "token_fingerprint",
            "step_up",
            "shadow",
        ] {
            assert_eq!(
                live[field], local[field],
                "{operation} ({expected}): `{field}` differs between --server and --config"
            );
        }
    }
}

#[test]
fn decide_against_an_unreachable_server_fails_with_exit_code_1() {
    // Port 1 on loopback: nothing listens there.
    let out = stepgate(&[
        "decide",
        "--server",
        "http://127.0.0.1:1",
        "--operation",
        "payments.wire_transfer",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(out.stdout.is_empty(), "{}", describe(&out));
}

/// A token is not sent in the clear beyond loopback: `http://` to another address is refused
/// before any connection is made (`https://` or a port-forward carries it).
#[test]
fn decide_sends_no_token_in_the_clear_beyond_loopback() {
    let token = mint_cli(&["--xms-cc", "cp1"]);
    let out = stepgate(&[
        "decide",
        "--server",
        "http://192.0.2.1:50051",
        "--token",
        &token,
        "--operation",
        "payments.wire_transfer",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("in the clear"),
        "{}",
        describe(&out)
    );
    assert!(!text(&out.stderr).contains(&token), "{}", describe(&out));
}

#[test]
fn check_error_names_the_field_path_once_as_documented() {
    let policy = TempPolicy::new(
        "readme-format",
        &edit(
            &demo_policy_text(),
            WIRE_REQUIRE,
            "require: { auth_contexts: [c1], max_age: fifteen }",
        ),
    );
    let out = stepgate(&["check", "--config", policy.path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("rules[1].require.max_age: expected a duration"),
        "not the README's format:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("rules[1].require.max_age").count(),
        1,
        "field path repeated:\n{stderr}"
    );
}

/// Transparent huge pages would turn a few touched bytes of the allocator's 2 MiB-aligned arenas
/// into whole 2 MiB pages of RSS; the server turns them off for itself (`PR_SET_THP_DISABLE`).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn serve_runs_with_transparent_huge_pages_disabled() {
    let server = Server::start(&demo_policy_path()).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("reading the server's /proc status");
    let thp = status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .expect("/proc/PID/status has a THP_enabled line (Linux 5.0 and later)");
    assert_eq!(thp.trim(), "0", "{status}");
}

/// `stepgate health` exits 0 printing SERVING for a ready server, and 1 when nothing listens.
#[tokio::test]
async fn health_reports_a_ready_server_and_fails_without_one() {
    let server = common::shared_server().await;
    let out = Command::new(bin())
        .args(["health", "--server", &server.url()])
        .output()
        .expect("running stepgate health");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let out = Command::new(bin())
        .args([
            "health",
            "--server",
            &format!("http://{closed}"),
            "--timeout",
            "1s",
        ])
        .output()
        .expect("running stepgate health");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{out:?}"
    );
}

#[test]
fn serve_refuses_a_buffer_budget_below_the_largest_message() {
    let out = stepgate(&[
        "serve",
        "--config",
        &common::demo_policy_path().display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--max-message-bytes",
        "2097152",
        "--max-buffered-bytes",
        "1048576",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = text(&out.stderr);
    assert!(
        err.contains("--max-buffered-bytes (1048576) is below --max-message-bytes (2097152)"),
        "{err}"
    );
}

#[test]
fn serve_refuses_check_callers_no_connection_could_be() {
    let policy = common::demo_policy_path().display().to_string();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--config", &policy, "--listen", "127.0.0.1:0"];
        args.extend(extra);
        stepgate(&args)
    };
    // Checked before the certificate files are read: these need not exist.
    let mtls = [
        "--tls-cert",
        "server.crt",
        "--tls-key",
        "server.key",
        "--client-ca",
        "ca.crt",
    ];
    for (extra, expected) in [
        (
            vec!["--client-san", "svc", "--check-client-san", "gw"],
            "--check-client-san dns name \"gw\" is not among --client-san",
        ),
        (
            vec!["--check-client-san", "gw,"],
            "an empty name matches no certificate",
        ),
        (vec!["--client-san", " gw"], "no surrounding spaces"),
    ] {
        let args: Vec<&str> = mtls.iter().copied().chain(extra).collect();
        let out = serve(&args);
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        assert!(text(&out.stderr).contains(expected), "{}", describe(&out));
    }
    let out = serve(&["--check-from", "10.1.2.3/8"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("write 10.0.0.0/8 for the network or 10.1.2.3"),
        "{}",
        describe(&out)
    );
}

#[test]
fn check_warns_of_conditions_reading_attributes_the_records_do_not_keep() {
    // The demo records amount and currency, which its escalation reads: nothing to warn of.
    let header = "warning: 2 condition(s) read Decide attributes";
    assert_eq!(
        check_warning("attrs-kept", &demo_policy_text(), header),
        Vec::<String>::new()
    );
    let added = r#"
  - id: refunds
    match: { operation: payments.refund, when: 'request.attributes.reason != "fraud"' }
    require: { authenticated: true }
    escalate:
      - when: 'request.attributes.amount > 100 || "vip" in request.attributes'
        require: { auth_contexts: [c1] }
"#;
    assert_eq!(
        check_warning("attrs-missing", &demo_with_rules(added), header),
        [
            "warning: 2 condition(s) read Decide attributes that decision records do not keep (records.attributes): stepgate replay decides them as if the attribute were missing:",
            "  rule 6. refunds match 1 when: reads [\"reason\"]",
            "  rule 6. refunds escalate 1 when: reads request.attributes other than by a name written in it",
        ]
    );
}

/// An identity header outside `x-stepgate-*` escapes the example Envoy configs' filter of a
/// client's copies.
#[test]
fn check_warns_of_an_identity_header_the_example_filter_misses() {
    let header = "warning: 1 identity header(s) are not named x-stepgate-*";
    let demo = demo_policy_text();
    let stdout = check_stdout("identity-names-demo", &demo);
    assert!(!stdout.contains(header), "{stdout}");
    let renamed = edit(
        &demo,
        "    x-stepgate-tenant: tenant",
        "    x-tenant: tenant",
    );
    let stdout = check_stdout("identity-names-other", &renamed);
    assert!(
        stdout.contains(header) && stdout.contains("\n  identity header x-tenant\n"),
        "{stdout}"
    );
}

#[test]
fn check_warns_of_a_signal_blocking_by_source_address() {
    let header = "warning: 1 risk signal(s) block by source address";
    let demo = demo_policy_text();
    let run = check_stdout;
    // The demo's signal only logs: nothing to warn of.
    assert!(!run("source-log", &demo).contains(header));
    let blocking = edit(
        &demo,
        "      action: log                        # then: action: block, block_for: 15m",
        "      action: block\n      block_for: 15m",
    );
    let stdout = run("source-block", &blocking);
    assert!(
        stdout.contains(header) && stdout.contains("\n  risk signal forged_tokens\n"),
        "{stdout}"
    );
    // A tenant's or a client's: one user tripping it blocks all of its users.
    let tenant_header = "warning: 1 risk signal(s) block a whole tenant or client application";
    assert!(!stdout.contains(tenant_header), "{stdout}");
    let by_tenant = edit(
        &demo,
        "      key: subject\n      window: 10m\n      threshold: 10\n      action: log                        # then: action: step_up, require: { auth_contexts: [c3] }",
        "      key: tenant\n      window: 10m\n      threshold: 10\n      action: block\n      block_for: 15m",
    );
    let stdout = run("tenant-block", &by_tenant);
    assert!(
        stdout.contains(tenant_header)
            && stdout.contains("\n  risk signal repeated_step_ups (key: tenant)\n"),
        "{stdout}"
    );
}
