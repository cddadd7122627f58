//! `stepgate test` against the real binary: the demo policy's own suite passes; a failing case
//! exits 1 with a diff and the explain trace; broken suites and policies exit 2 with the field
//! path; JUnit XML is well formed (read back by Python's XML parser); coverage names what no case
//! reached; issuers known only by discovery or accepting only RS256 are tested without any network.

mod common;

use std::{path::Path, process::Command};

use common::{TempPolicy, demo_policy_path, manifest_dir};

/// `stepgate test --config <policy> <suites…> [extra]`: (exit code, stdout, stderr).
fn run(policy: &Path, suites: &[&Path], extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["test".as_ref(), "--config".as_ref(), policy.as_ref()];
    args.extend(suites.iter().map(|s| s.as_os_str()));
    args.extend(extra.iter().map(|e| std::ffi::OsStr::new(*e)));
    common::run_bin(args)
}

/// A suite file next to `dir`'s policy.
fn suite(dir: &TempPolicy, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path.parent().unwrap().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_demo_policy_passes_its_own_suite_and_covers_every_rule() {
    let demo_suite = manifest_dir().join("examples/tests/demo.yaml");
    let (code, stdout, stderr) = run(&demo_policy_path(), &[&demo_suite], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let cases = std::fs::read_to_string(&demo_suite)
        .unwrap()
        .matches("\n  - name:")
        .count();
    assert!(cases >= 15);
    assert!(
        stdout.contains(&format!("{cases} case(s): {cases} passed, 0 failed")),
        "{stdout}"
    );
    assert!(
        stdout.contains("coverage: every rule and escalation was reached"),
        "{stdout}"
    );
}

/// Under `subject_claim: oid` the suite's tokens carry their subject as `oid` too: the demo's own
/// suite passes unchanged with its Entra issuer named by `oid`.
#[test]
fn a_suite_passes_with_the_subject_named_by_oid() {
    let text = common::demo_policy_text().replacen(
        "    challenge: entra\n",
        "    challenge: entra\n    subject_claim: oid\n",
        1,
    );
    assert!(text.contains("    subject_claim: oid\n"));
    let policy = TempPolicy::new("suite-oid", &text);
    let demo_suite = manifest_dir().join("examples/tests/demo.yaml");
    let (code, stdout, stderr) = run(&policy.path, &[&demo_suite], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(!stdout.contains("claim_invalid"), "{stdout}");
    // A token case's `sub` is its `oid` there too, unless it gives one: a rule asks for it.
    let (head, tail) = text
        .split_once("\nrules:")
        .expect("the demo policy has rules");
    let (rules_line, rules) = tail.split_once('\n').unwrap();
    let text = format!(
        "{head}\nrules:{rules_line}\n  - id: carol-only\n    match: {{ operation: oid.check }}\n    \
         require: {{ claims: {{ oid: [carol] }} }}\n{rules}"
    );
    let policy = TempPolicy::new("suite-oid-token", &text);
    let cases = suite(
        &policy,
        "oid-token.yaml",
        r#"
cases:
  - name: the sub of a token case is its oid
    request: { operation: oid.check }
    token: { issuer: demo-entra, claims: { sub: carol } }
    expect: { outcome: ALLOW, rule: carol-only }
  - name: an oid of its own wins
    request: { operation: oid.check }
    token: { issuer: demo-entra, claims: { sub: carol, oid: c-0001 } }
    expect: { outcome: DENY, rule: carol-only }
"#,
    );
    let (code, stdout, stderr) = run(&policy.path, &[&cases], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}

const FAILING: &str = r#"
now: 1796117400
cases:
  - name: a passing case
    request: { operation: reports.read }
    principal: { issuer: demo-oidc }
    expect: { outcome: ALLOW, rule: everything-else }
  - name: wrongly expects <ALLOW> & "no challenge"
    request: { operation: payments.wire_transfer }
    principal: { issuer: demo-entra, subject: alice, xms_cc: [cp1] }
    expect:
      outcome: ALLOW
      rule: wire-transfer
      challenge: { auth_contexts: [c2] }
"#;

#[test]
fn a_failing_case_shows_expected_against_got_with_the_trace_and_junit() {
    let policy = TempPolicy::new("suite-fail", &common::demo_policy_text());
    let failing = suite(&policy, "failing.yaml", FAILING);
    let junit = policy.path.parent().unwrap().join("junit.xml");
    let (code, stdout, _) = run(
        &policy.path,
        &[&failing],
        &["--junit", junit.to_str().unwrap()],
    );
    assert_eq!(code, Some(1), "{stdout}");
    for line in [
        "PASS  a passing case",
        "FAIL  wrongly expects <ALLOW> & \"no challenge\"",
        "outcome: expected ALLOW, got STEP_UP",
        "challenge.auth_contexts: expected [c2], got [c1]",
        "decision: STEP_UP missing_auth_context (401) rule=wire-transfer asks auth_contexts=[c1]",
        "match     rule \"wire-transfer\"",
        "2 case(s): 1 passed, 1 failed",
        "coverage: no case reached rule(s) health, customer-data-strict, customer-pii, admin",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
    assert!(
        stdout.contains("no case made this escalation hold: wire-transfer escalate[0]"),
        "{stdout}"
    );
    // The JUnit file parses as XML, with the counts and the escaped name.
    let check = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as ET\n\
             root = ET.parse(sys.argv[1]).getroot()\n\
             suite = root.find('testsuite')\n\
             cases = suite.findall('testcase')\n\
             failed = [c for c in cases if c.find('failure') is not None]\n\
             print(root.get('tests'), root.get('failures'), len(cases), failed[0].get('name'))\n\
             print(failed[0].find('failure').get('message'))",
        ])
        .arg(&junit)
        .output()
        .expect(
            "python3 is needed to read the JUnit file back (scripts/setup-peers checks for it)",
        );
    let read = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut lines = read.lines();
    assert_eq!(
        lines.next(),
        Some("2 1 2 wrongly expects <ALLOW> & \"no challenge\"")
    );
    assert!(
        lines
            .next()
            .unwrap()
            .contains("outcome: expected ALLOW, got STEP_UP")
    );
}

#[test]
fn broken_suites_and_policies_exit_2_with_the_field_path() {
    let policy = TempPolicy::new("suite-broken", &common::demo_policy_text());
    let case = |body: &str| {
        format!("cases:\n  - name: x\n    request: {{ operation: reports.read }}\n{body}")
    };
    for (text, wanted) in [
        (
            case("    expect: { outcom: ALLOW }\n"),
            "cases[0].expect.outcom: unknown field `outcom`",
        ),
        (
            case("    expect: { outcome: ALLOWED }\n"),
            "cases[0].expect.outcome",
        ),
        (
            case("    principal: { issuer: nobody }\n    expect: { outcome: ALLOW }\n"),
            "cases[0].principal.issuer: no issuer has id \"nobody\"",
        ),
        (
            case("    expect: { outcome: ALLOW, rule: nothing }\n"),
            "cases[0].expect.rule: the policy has no rule \"nothing\"",
        ),
        (
            case("    expect: { outcome: ALLOW, reason: fine }\n"),
            "cases[0].expect.reason",
        ),
        (
            "now: yesterday\ncases: []\n".to_owned(),
            "now: expected an RFC 3339 time",
        ),
        ("cases: []\n".to_owned(), "cases: list at least one case"),
    ] {
        let path = suite(&policy, "broken.yaml", &text);
        // A passing report of an earlier run must not survive a broken one for CI to read.
        let junit = policy.path.parent().unwrap().join("junit.xml");
        std::fs::write(&junit, "<testsuites tests=\"1\" failures=\"0\"/>").unwrap();
        let (code, stdout, stderr) = run(
            &policy.path,
            &[&path],
            &["--junit", junit.to_str().unwrap()],
        );
        assert_eq!(code, Some(2), "{text}: {stdout}{stderr}");
        assert!(stderr.contains(wanted), "{wanted:?} not in {stderr}");
        assert!(stderr.contains("broken.yaml"), "{stderr}");
        assert!(!junit.exists(), "the old report was left for {text}");
    }
    // What is not a regular file (a link, a FIFO, /dev/stdout) is left as it is.
    #[cfg(unix)]
    {
        let dir = policy.path.parent().unwrap();
        let (target, link) = (dir.join("real.xml"), dir.join("link.xml"));
        std::fs::write(&target, "old").unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let path = suite(&policy, "broken.yaml", "cases: []\n");
        let (code, _, stderr) = run(&policy.path, &[&path], &["--junit", link.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
    let bad_policy = TempPolicy::new("suite-bad-policy", "rules: []\nissuers: []\n");
    let path = suite(&bad_policy, "ok.yaml", FAILING);
    let (code, _, stderr) = run(&bad_policy.path, &[&path], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("invalid policy"), "{stderr}");
}

#[test]
fn issuers_known_by_discovery_or_accepting_only_ps256_and_at_jwt_are_tested_offline() {
    // Discovery and key addresses no test can reach: the runner needs neither.
    let policy = TempPolicy::new(
        "suite-offline",
        r#"
issuers:
  - id: corp
    discovery_url: https://login.corp.example/.well-known/openid-configuration
    audiences: [api://orders]
  - id: okta
    issuer: https://corp.okta.example/oauth2/default
    jwks_uri: https://corp.okta.example/oauth2/default/v1/keys
    audiences: [api://orders]
    algorithms: [PS256]
    require_at_jwt: true
rules:
  - id: orders
    match: { path: "/orders/**" }
    require: { scopes: [orders.read] }
"#,
    );
    let cases = suite(
        &policy,
        "offline.yaml",
        r#"
cases:
  - name: an RS256 token of a discovered issuer with the scope
    request: { path: /orders/7 }
    token: { issuer: corp, claims: { scope: orders.read } }
    expect: { outcome: ALLOW, rule: orders }
  - name: a PS256 token without it (typed at+jwt, as the issuer requires)
    request: { path: /orders/7 }
    token: { issuer: okta, claims: { scope: profile } }
    expect: { outcome: DENY, reason: missing_scope, rule: orders }
  - name: a forged one
    request: { path: /orders/7 }
    token: { issuer: corp, forged: true, claims: { scope: orders.read } }
    expect: { outcome: DENY, reason: signature_invalid }
"#,
    );
    let (code, stdout, stderr) = run(&policy.path, &[&cases], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("3 case(s): 3 passed, 0 failed"), "{stdout}");
    // `check` names the issuer discovery will be held to, and the token type required.
    let (code, stdout, stderr) = common::run_bin([
        "check".as_ref(),
        "--config".as_ref(),
        policy.path.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("https://login.corp.example (from discovery)")
            && stdout.contains("typ=at+jwt"),
        "{stdout}"
    );
}

#[test]
fn shadow_rules_record_without_deciding_even_for_anonymous_callers_and_broken_conditions() {
    let policy = TempPolicy::new(
        "suite-shadow",
        r#"
issuers:
  - id: corp
    issuer: https://login.corp.example
    jwks_uri: https://login.corp.example/keys
    audiences: [api://orders]
rules:
  - id: strict-everything
    mode: shadow
    match: { path: "/**" }
    require: { roles: [Auditor] }
  - id: broken-trial
    mode: shadow
    match: { path: "/orders/**", when: "request.attributes.nothing > 1" }
    require: { roles: [x] }
  - id: public
    match: { path: "/public/**" }
    allow_anonymous: true
  - id: orders
    match: { path: "/orders/**" }
    require: { scopes: [orders.read] }
    escalate:
      - when: "true"
        require: { scopes: [orders.admin] }
        mode: shadow
"#,
    );
    let cases = suite(
        &policy,
        "shadow.yaml",
        r#"
cases:
  - name: anonymous on a public page; the trial rule would want a token
    request: { path: /public/x }
    expect:
      outcome: ALLOW
      rule: public
      shadow: ["strict-everything:DENY:token_missing"]
  - name: orders with the scope; each trial records, none decides
    request: { path: /orders/7 }
    token: { issuer: corp, claims: { scope: orders.read } }
    expect:
      outcome: ALLOW
      rule: orders
      shadow:
        - "strict-everything:DENY:missing_role"
        - "broken-trial:DENY:condition_error"
        - "orders/escalate[0]:DENY:missing_scope"
"#,
    );
    let (code, stdout, stderr) = run(&policy.path, &[&cases], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("2 case(s): 2 passed, 0 failed"), "{stdout}");
    assert!(
        stdout.contains("coverage: every rule and escalation was reached"),
        "{stdout}"
    );
}

/// Two cases with the same claims sign the same token (RS256 signatures are deterministic): each
/// is still decided at its own `now`, not answered by the other's cached verification.
#[test]
fn each_case_verifies_its_own_token_at_its_own_time() {
    let policy = TempPolicy::new(
        "suite-cache",
        &common::demo_policy_text().replace("algorithms: [RS256, ES256]", "algorithms: [RS256]"),
    );
    let claims = "{ sub: bob, iat: 1796119200, nbf: 1796119200, exp: 1796130000 }";
    let cases = suite(
        &policy,
        "order.yaml",
        &format!(
            "cases:
  - name: at 10:00 the token is valid
    now: 2026-12-01T10:00:00Z
    request: {{ method: GET, path: /api/orders/1 }}
    token: {{ issuer: demo-oidc, claims: {claims} }}
    expect: {{ outcome: ALLOW }}
  - name: at 09:00, before its nbf, it is not
    now: 2026-12-01T09:00:00Z
    request: {{ method: GET, path: /api/orders/1 }}
    token: {{ issuer: demo-oidc, claims: {claims} }}
    expect: {{ outcome: DENY, reason: token_not_yet_valid }}
"
        ),
    );
    let (code, stdout, stderr) = run(&policy.path, &[&cases], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("2 case(s): 2 passed, 0 failed"), "{stdout}");
}

/// A case's token is typed as the issuer's provider types it: an Entra ID issuer that requires
/// `at+jwt` (which Entra never sends) fails its cases, as it would fail every real token, and
/// `stepgate check` says why; a case may still type its token itself.
#[test]
fn tokens_are_typed_as_the_provider_types_them() {
    let policy = TempPolicy::new(
        "suite-typ",
        &common::demo_policy_text().replacen(
            "    challenge: entra\n",
            "    challenge: entra\n    require_at_jwt: true\n",
            1,
        ),
    );
    let cases = suite(
        &policy,
        "typ.yaml",
        r#"
cases:
  - name: an Entra token, typed JWT as Entra types it
    request: { operation: reports.read }
    principal: { issuer: demo-entra }
    expect: { outcome: DENY, reason: token_type_invalid }
  - name: the same typed at+jwt, which Entra never sends
    request: { operation: reports.read }
    token: { issuer: demo-entra, typ: at+jwt }
    expect: { outcome: ALLOW }
  - name: with no typ at all
    request: { operation: reports.read }
    token: { issuer: demo-entra, typ: "" }
    expect: { outcome: DENY, reason: token_type_invalid }
"#,
    );
    let (code, stdout, stderr) = run(&policy.path, &[&cases], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("3 case(s): 3 passed, 0 failed"), "{stdout}");
    let (code, stdout, stderr) = common::check_policy(&policy.path);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("warning: 1 issuer(s) look like Entra ID but set require_at_jwt")
            && stdout
                .contains("  issuer demo-entra (https://login.demo.stepgate.invalid/entra/v2.0)"),
        "{stdout}"
    );

    // Entra ID known by its address, left at challenge: rfc9470: typed as Entra types it too.
    let at_entra = TempPolicy::new(
        "suite-typ-address",
        &common::demo_policy_text().replacen(
            "    issuer: https://login.demo.stepgate.invalid/oidc\n",
            "    issuer: https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0\n    require_at_jwt: true\n",
            1,
        ),
    );
    let cases = suite(
        &at_entra,
        "typ.yaml",
        r#"
cases:
  - name: a token of Entra's address, typed JWT as Entra types it
    request: { operation: reports.read }
    principal: { issuer: demo-oidc }
    expect: { outcome: DENY, reason: token_type_invalid }
"#,
    );
    let (code, stdout, stderr) = run(&at_entra.path, &[&cases], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}
