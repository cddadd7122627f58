//! `stepgate replay` against the real binary, on a fixture of 2005 record lines whose effect under
//! a candidate policy is computed by hand: the catch-all rule asks for MFA (c1), so exactly the
//! 500 catch-all requests without it turn from ALLOW into STEP_UP, and nothing else changes.

mod common;

use std::fmt::Write as _;

use common::{TempPolicy, demo_policy_path, demo_policy_text};
use serde_json::{Value, json};

/// 2026-12-01T00:00:00Z.
const START: i64 = 1_796_083_200;

fn time(at: i64) -> String {
    chrono_like(at)
}

/// RFC 3339 UTC of `at` (whole seconds).
fn chrono_like(at: i64) -> String {
    let (days, secs) = (at.div_euclid(86_400), at.rem_euclid(86_400));
    // 2026-12-01 is day 20788; the fixture stays within December 2026.
    let day = days - 20_788 + 1;
    format!(
        "2026-12-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn facts(subject: &str, acrs: &[&str], auth_time: i64) -> Value {
    json!({"issuer": "demo-entra", "subject": subject, "tenant": "72f988bf-86f1-41af-91ab-2d7cd011db47",
           "client_id": "web", "acrs": acrs, "amr": ["pwd"], "auth_time": auth_time,
           "scopes": ["user_impersonation"], "xms_cc": ["cp1"]})
}

/// The fixture: (records text, line numbers of the malformed lines).
fn fixture() -> (String, Vec<usize>) {
    let mut out = String::new();
    let mut bad = Vec::new();
    let mut line = 0;
    let push = |out: &mut String, v: Value| {
        writeln!(out, "{v}").unwrap();
    };
    for i in 0..2000i64 {
        let at = START + i * 40; // 2000 records over about 22 hours
        let record = match i % 4 {
            // 1000 catch-all reads by 100 subjects; the even-numbered subjects have MFA.
            0 | 1 => {
                let n = (i / 4) % 100;
                let acrs: &[&str] = if n % 2 == 0 { &["c1"] } else { &[] };
                json!({"time": time(at), "door": "check", "method": "GET", "host": "api.example",
                       "path": format!("/api/orders/{i}?expand=items"),
                       "token": facts(&format!("user-{n}"), acrs, at - 60),
                       "outcome": "ALLOW", "reason": "allowed", "status": 200, "rule": "everything-else"})
            }
            // 500 wire transfers with fresh MFA.
            2 => json!({"time": time(at), "door": "decide", "operation": "payments.wire_transfer",
                        "attributes": {"amount": 100.0},
                        "token": facts(&format!("user-{}", i % 100), &["c1"], at - 60),
                        "outcome": "ALLOW", "reason": "allowed", "status": 200, "rule": "wire-transfer"}),
            // 250 health probes and 250 forged tokens (no facts: kept as recorded).
            _ if i % 8 == 3 => json!({"time": time(at), "door": "check", "method": "GET",
                        "host": "api.example", "path": "/healthz",
                        "outcome": "ALLOW", "reason": "anonymous_allowed", "status": 200, "rule": "health"}),
            _ => json!({"time": time(at), "door": "check", "method": "GET", "host": "api.example",
                        "path": "/api/orders/1", "outcome": "DENY", "reason": "signature_invalid", "status": 401}),
        };
        push(&mut out, record);
        line += 1;
        if i % 400 == 7 {
            // A truncated line, as a crash mid-write leaves.
            out.push_str("{\"time\":\"2026-12-01T01:00:00Z\",\"door\":\"che\n");
            line += 1;
            bad.push(line);
        }
    }
    (out, bad)
}

/// The candidate: the catch-all asks for MFA.
fn candidate() -> TempPolicy {
    let text = common::edit(
        &demo_policy_text(),
        "    require: { authenticated: true }\n",
        "    require: { auth_contexts: [c1] }\n",
    );
    TempPolicy::new("replay-candidate", &text)
}

fn replay(args: &[&str]) -> (Option<i32>, String, String) {
    common::run_bin(std::iter::once("replay").chain(args.iter().copied()))
}

#[test]
fn a_candidate_that_asks_for_mfa_shows_its_exact_friction_and_changes() {
    let policy = candidate();
    let (text, bad_lines) = fixture();
    let records = policy.path.parent().unwrap().join("records.jsonl");
    std::fs::write(&records, text).unwrap();
    let records = records.to_str().unwrap();
    let candidate = policy.path.to_str().unwrap();
    let demo = demo_policy_path();

    // Against the recorded answers, and against the current policy decided again: the same.
    for baseline in [None, Some(demo.to_str().unwrap())] {
        let mut args = vec!["--records", records, "--policy", candidate, "--json"];
        if let Some(b) = baseline {
            args.extend(["--baseline", b]);
        }
        let (code, stdout, stderr) = replay(&args);
        assert_eq!(code, Some(0), "{stderr}");
        let report: Value = serde_json::from_str(&stdout).expect("JSON");
        assert_eq!(report["records"], 2000);
        assert_eq!(report["kept_as_recorded"], 250, "the forged tokens");
        assert_eq!(report["unreadable_lines"], bad_lines.len());
        let lines: Vec<u64> = report["unreadable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["line"].as_u64().unwrap())
            .collect();
        assert_eq!(
            lines,
            bad_lines.iter().map(|&l| l as u64).collect::<Vec<_>>()
        );
        assert_eq!(
            report["overall"],
            json!({
                "baseline": {"requests": 2000, "allow": 1750, "step_up": 0, "deny": 250},
                "candidate": {"requests": 2000, "allow": 1250, "step_up": 500, "deny": 250},
            }),
            "baseline {baseline:?}"
        );
        assert_eq!(report["changes"]["total"], 500);
        assert_eq!(report["changes"]["new_protections"], 500);
        assert_eq!(report["changes"]["relaxations"], 0);
        assert_eq!(
            report["changes"]["by_outcome"],
            json!([{"from": "ALLOW", "to": "STEP_UP", "count": 500}])
        );
        // 100 subjects; the 50 without MFA are prompted, 10 times each, within one day.
        assert_eq!(report["friction"]["subjects"], 100);
        assert_eq!(report["friction"]["baseline"]["share_prompted"], 0.0);
        assert_eq!(report["friction"]["candidate"]["share_prompted"], 0.5);
        assert_eq!(
            report["friction"]["candidate"]["step_ups_per_subject_per_day"],
            5.0
        );
        let rules = report["rules"].as_array().unwrap();
        let everything_else = rules
            .iter()
            .find(|r| r["rule"] == "everything-else")
            .unwrap();
        assert_eq!(everything_else["candidate"]["step_up"], 500);
        let top = &report["changes"]["top"][0];
        assert_eq!(top["to"]["reason"], "missing_auth_context");
        assert_eq!(top["from"]["outcome"], "ALLOW");
    }

    // The text report says the same for people.
    let (code, stdout, _) = replay(&["--records", records, "--policy", candidate]);
    assert_eq!(code, Some(0));
    for line in [
        "2000 records replayed (250 of refused or blocked requests kept as recorded",
        "signatures are not verified again",
        "5 unreadable line(s), skipped:",
        "changes: 500 request(s) answered differently: 500 new protection(s)",
        "ALLOW → STEP_UP: 500",
        "subjects prompted at least once 0.0% → 50.0% (of 100 subjects)",
    ] {
        assert!(stdout.contains(line), "{line:?} missing:\n{stdout}");
    }
}

#[test]
fn a_broken_policy_or_a_missing_file_exits_2() {
    let (code, _, stderr) = replay(&[
        "--records",
        "/nonexistent/records.jsonl",
        "--policy",
        demo_policy_path().to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/records.jsonl"), "{stderr}");
    let broken = TempPolicy::new("replay-broken", "rules: []\nissuers: []\n");
    let (code, _, stderr) = replay(&[
        "--records",
        "/dev/null",
        "--policy",
        broken.path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
}

/// Records hold what callers sent: an operation, a path and a method of their choosing, and a
/// rule or subject a tampered file may claim. The text report shows each escaped, so that none
/// can rewrite the terminal (`ESC ]0;` retitles it, `ESC [2K` erases a line, `CR` overwrites
/// one) or make up a line of the report.
#[test]
fn control_characters_in_records_reach_the_text_report_escaped() {
    let policy = candidate();
    let records = policy.path.parent().unwrap().join("hostile-records.jsonl");
    let forged = "\u{1b}]0;PWNED\u{7}\u{1b}[2K\r\u{1b}[32m  0 relaxation(s)\u{1b}[0m\n0 changes";
    let mut text = String::new();
    for i in 0..3i64 {
        let at = START + i * 60;
        for record in [
            json!({"time": time(at), "door": "decide", "operation": format!("orders.read{forged}"),
                   "token": facts("user-1", &[], at - 60),
                   "outcome": "ALLOW", "reason": "allowed", "status": 200,
                   "rule": format!("everything-else{forged}")}),
            json!({"time": time(at), "door": "check", "method": format!("GET{forged}"),
                   "host": "api.example", "path": format!("/api/orders/1{forged}\u{85}\u{2028}"),
                   "token": facts("hmac-sha256:\u{1b}[2Kuser-2", &[], at - 60),
                   "outcome": "ALLOW", "reason": "allowed", "status": 200, "rule": "everything-else"}),
        ] {
            writeln!(text, "{record}").unwrap();
        }
    }
    std::fs::write(&records, text).unwrap();
    // Against the recorded answers (ALLOW): the candidate denies all six, so every record's
    // operation, path, method and rule is in the report.
    let (code, report, stderr) = replay(&[
        "--records",
        records.to_str().unwrap(),
        "--policy",
        policy.path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let raw: Vec<char> = report
        .chars()
        .filter(|&c| c != '\n' && (c.is_control() || c == '\u{2028}'))
        .collect();
    assert!(raw.is_empty(), "raw {raw:?} in:\n{report}");
    assert!(
        !report.lines().any(|l| l.starts_with("0 changes")),
        "a line made up by a record:\n{report}"
    );
    let shown =
        "\\u{1b}]0;PWNED\\u{7}\\u{1b}[2K\\r\\u{1b}[32m  0 relaxation(s)\\u{1b}[0m\\n0 changes";
    for expected in [
        format!("× orders.read{shown} ("),
        format!("× GET{shown} /api/orders/1{shown}\\u{{85}}\\u{{2028}} ("),
        format!("(everything-else{shown}) → DENY"),
        format!("\neverything-else{shown} "),
        "× hmac-sha256:\\u{1b}[2Kuser-2\n".to_owned(),
    ] {
        assert!(
            report.contains(&expected),
            "{expected:?} missing:\n{report}"
        );
    }
}

/// A record holding only the beginning of its path (`truncated`) cannot be decided again: it keeps
/// its recorded answer on both sides, where the same record whole would change, and so does one
/// cut only in its request id.
#[test]
fn a_truncated_record_keeps_its_recorded_answer() {
    let policy = candidate();
    let records = policy
        .path
        .parent()
        .unwrap()
        .join("truncated-records.jsonl");
    let mut text = String::new();
    // Cut in its path; whole; cut only in its request id, which no decision reads.
    for truncated in [Some("path"), None, Some("request_id")] {
        let mut record = json!({"time": time(START), "door": "check", "method": "GET",
               "host": "api.example", "path": "/api/orders/1",
               "token": facts("user-1", &[], START - 60),
               "outcome": "ALLOW", "reason": "allowed", "status": 200, "rule": "everything-else"});
        if let Some(field) = truncated {
            record["truncated"] = json!([field]);
        }
        writeln!(text, "{record}").unwrap();
    }
    std::fs::write(&records, text).unwrap();
    let (code, stdout, stderr) = replay(&[
        "--records",
        records.to_str().unwrap(),
        "--policy",
        policy.path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["records"], 3, "{report}");
    assert_eq!(report["kept_as_recorded"], 1, "{report}");
    assert_eq!(
        report["overall"]["candidate"],
        json!({"requests": 3, "allow": 1, "step_up": 2, "deny": 0}),
        "the records whose decided fields are whole are decided again (a step-up): {report}"
    );
}
