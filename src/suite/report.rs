//! How a run is told: a readable report on the terminal, and JUnit XML for CI systems.

use std::fmt::Write as _;

use super::CaseResult;

/// The terminal report: a line per case, a diff and the explain trace per failing case, the
/// uncovered rules and escalations, and a summary line.
pub fn text(results: &[CaseResult], uncovered: &(Vec<String>, Vec<String>)) -> String {
    let mut out = String::new();
    for r in results {
        if r.passed() {
            let _ = writeln!(out, "PASS  {}", r.name);
            continue;
        }
        let _ = writeln!(
            out,
            "FAIL  {}  ({} case {})",
            r.name,
            r.file.display(),
            r.index + 1
        );
        for (field, expected, got) in &r.mismatches {
            let _ = writeln!(out, "      {field}: expected {expected}, got {got}");
        }
        let _ = writeln!(out, "      decision: {}", r.got);
        for step in &r.explain {
            let _ = writeln!(out, "        {:<9} {}", step.stage, step.detail);
        }
    }
    let (rules, escalations) = uncovered;
    if !rules.is_empty() {
        let _ = writeln!(
            out,
            "coverage: no case reached rule(s) {}",
            rules.join(", ")
        );
    }
    for e in escalations {
        let _ = writeln!(out, "coverage: no case made this escalation hold: {e}");
    }
    if rules.is_empty() && escalations.is_empty() {
        let _ = writeln!(out, "coverage: every rule and escalation was reached");
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    let _ = writeln!(
        out,
        "{} case(s): {} passed, {failed} failed",
        results.len(),
        results.len() - failed
    );
    out
}

/// JUnit XML: a `testsuite` per file, a `testcase` per case, a `failure` with the diff and trace.
pub fn junit(results: &[CaseResult]) -> String {
    let mut files: Vec<&std::path::Path> = Vec::new();
    for r in results {
        if !files.contains(&r.file.as_path()) {
            files.push(&r.file);
        }
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"stepgate test\" tests=\"{}\" failures=\"{failed}\">",
        results.len()
    );
    for file in files {
        let cases: Vec<&CaseResult> = results.iter().filter(|r| r.file == file).collect();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\">",
            escape(&file.display().to_string()),
            cases.len(),
            cases.iter().filter(|r| !r.passed()).count()
        );
        for r in cases {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}\"",
                escape(&file.display().to_string()),
                escape(&r.name)
            );
            if r.passed() {
                out.push_str("/>\n");
                continue;
            }
            let summary: Vec<String> = r
                .mismatches
                .iter()
                .map(|(f, e, g)| format!("{f}: expected {e}, got {g}"))
                .collect();
            let mut body = format!("decision: {}\n", r.got);
            for step in &r.explain {
                let _ = writeln!(body, "{}: {}", step.stage, step.detail);
            }
            let _ = write!(
                out,
                ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                escape(&summary.join("; ")),
                escape(&body)
            );
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Text for an XML attribute or element; characters XML 1.0 cannot carry become U+FFFD.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}
