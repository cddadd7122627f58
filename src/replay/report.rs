//! The replay report: a text table for the terminal and JSON for machines.
//!
//! Records are what callers sent (an operation, a path, a method, a rule or subject a record
//! claims): in the text report every string read from them, or from the command line, is written
//! through [`Printable`], so that none can move the cursor, retitle the terminal or make up a
//! line of the report.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Replay, Tally};
use crate::telemetry::Printable;

/// How many changed requests the report lists.
const TOP: usize = 10;

fn rate(n: u64, of: u64) -> f64 {
    if of == 0 { 0.0 } else { n as f64 / of as f64 }
}

fn days(r: &Replay) -> f64 {
    match (r.first_time, r.last_time) {
        (Some(a), Some(b)) => ((b - a) as f64 / 86_400.0).max(1.0),
        _ => 1.0,
    }
}

/// Step-ups per distinct subject per day, and the share of subjects prompted at least once.
pub fn friction(r: &Replay, side: usize) -> (f64, f64) {
    let subjects = r.subjects.len() as u64;
    (
        rate(r.step_ups[side], subjects) / days(r),
        rate(r.prompted[side].len() as u64, subjects),
    )
}

/// A changed request: (what, from, to) and (count, subjects).
type Changed<'a> = (
    &'a (String, super::Answer, super::Answer),
    &'a (u64, super::Subjects),
);

/// The changed requests, most frequent first.
pub fn top_changes(r: &Replay) -> Vec<Changed<'_>> {
    let mut changes: Vec<_> = r.changed_requests.iter().collect();
    changes.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(b.0)));
    changes.truncate(TOP);
    changes
}

/// The subjects most often answered differently (shown hashed), most first.
pub fn top_subjects(r: &Replay) -> Vec<(String, u64)> {
    let mut subjects: Vec<(&String, &u64)> = r.changed_subjects.iter().collect();
    subjects.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    subjects
        .into_iter()
        .take(TOP)
        .map(|(s, n)| (super::shown_subject(s), *n))
        .collect()
}

/// New protections (ALLOW → STEP_UP or DENY) and relaxations (→ ALLOW).
pub fn protections_and_relaxations(r: &Replay) -> (u64, u64) {
    let mut protections = 0;
    let mut relaxations = 0;
    for ((from, to), n) in &r.changes {
        if *from == "ALLOW" && *to != "ALLOW" {
            protections += n;
        } else if *from != "ALLOW" && *to == "ALLOW" {
            relaxations += n;
        }
    }
    (protections, relaxations)
}

pub fn text(r: &Replay, baseline_name: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} records replayed ({} of refused or blocked requests kept as recorded, {} of issuers the candidate lacks, decided as issuer_unknown); signatures are not verified again: each record holds what verification established",
        r.records, r.as_recorded, r.unknown_issuer
    );
    if r.requests != r.records {
        let _ = writeln!(
            out,
            "the records stand for {} requests: sampled ALLOWs (records.allow_sample) count for the ALLOWs they stand for, in every figure but the distinct subjects",
            r.requests
        );
    }
    if r.bad_line_count > 0 {
        let _ = writeln!(out, "{} unreadable line(s), skipped:", r.bad_line_count);
        for bad in &r.bad_lines {
            let _ = writeln!(
                out,
                "  {}:{}: {}",
                Printable(&bad.file),
                bad.line,
                Printable(&bad.error)
            );
        }
    }
    let _ = writeln!(out, "\nbaseline: {}", Printable(baseline_name));
    let row = |out: &mut String, name: &str, t: &[Tally; 2]| {
        let pct = |n: u64, t: &Tally| 100.0 * rate(n, t.total());
        let _ = writeln!(
            out,
            "{:<28} {:>8} {:>8}   {:>6.1}% {:>6.1}%   {:>6.1}% {:>6.1}%   {:>6.1}% {:>6.1}%",
            Printable(name),
            t[0].total(),
            t[1].total(),
            pct(t[0].allow, &t[0]),
            pct(t[1].allow, &t[1]),
            pct(t[0].step_up, &t[0]),
            pct(t[1].step_up, &t[1]),
            pct(t[0].deny, &t[0]),
            pct(t[1].deny, &t[1]),
        );
    };
    let _ = writeln!(
        out,
        "{:<28} {:>8} {:>8}   {:>15}   {:>15}   {:>15}",
        "rule", "base", "cand", "ALLOW base/cand", "STEP_UP", "DENY"
    );
    for (rule, t) in &r.per_rule {
        row(
            &mut out,
            if rule.is_empty() { "(no rule)" } else { rule },
            t,
        );
    }
    row(&mut out, "all", &r.overall);
    let (base_rate, base_share) = friction(r, 0);
    let (cand_rate, cand_share) = friction(r, 1);
    let _ = writeln!(
        out,
        "\nfriction: step-ups per subject per day {base_rate:.2} → {cand_rate:.2}; subjects prompted at least once {:.1}% → {:.1}% (of {} subjects)",
        100.0 * base_share,
        100.0 * cand_share,
        r.subjects.len()
    );
    let (protections, relaxations) = protections_and_relaxations(r);
    let changed: u64 = r.changes.values().sum();
    let _ = writeln!(
        out,
        "changes: {changed} request(s) answered differently: {protections} new protection(s) (ALLOW → STEP_UP/DENY), {relaxations} relaxation(s) (→ ALLOW)"
    );
    for ((from, to), n) in &r.changes {
        let _ = writeln!(out, "  {from} → {to}: {n}");
    }
    if !r.changed_requests.is_empty() {
        let _ = writeln!(out, "top changed requests:");
        for ((what, from, to), (n, subjects)) in top_changes(r) {
            let asking = |answer: &super::Answer| {
                if answer.asks.is_empty() {
                    String::new()
                } else {
                    format!(" asking {}", Printable(&answer.asks))
                }
            };
            let _ = writeln!(
                out,
                "  {n:>7}× {} ({} subjects): {} {} ({}){} → {} {} ({}){}",
                Printable(what),
                subjects.len(),
                from.outcome,
                from.reason,
                Printable(&from.rule),
                asking(from),
                to.outcome,
                to.reason,
                Printable(&to.rule),
                asking(to)
            );
        }
        let _ = writeln!(out, "subjects most often answered differently (hashed):");
        for (subject, n) in top_subjects(r) {
            let _ = writeln!(out, "  {n:>7}× {}", Printable(&subject));
        }
    }
    out
}

pub fn json(r: &Replay, baseline_name: &str) -> Value {
    let tally = |t: &Tally| json!({"requests": t.total(), "allow": t.allow, "step_up": t.step_up, "deny": t.deny});
    let (base_rate, base_share) = friction(r, 0);
    let (cand_rate, cand_share) = friction(r, 1);
    let (protections, relaxations) = protections_and_relaxations(r);
    json!({
        "baseline": baseline_name,
        "records": r.records,
        "requests": r.requests,
        "kept_as_recorded": r.as_recorded,
        "unknown_issuer": r.unknown_issuer,
        "unreadable_lines": r.bad_line_count,
        "unreadable": r.bad_lines.iter().map(|b| json!({"file": b.file, "line": b.line, "error": b.error})).collect::<Vec<_>>(),
        "overall": {"baseline": tally(&r.overall[0]), "candidate": tally(&r.overall[1])},
        "rules": r.per_rule.iter().map(|(rule, t)| json!({"rule": rule, "baseline": tally(&t[0]), "candidate": tally(&t[1])})).collect::<Vec<_>>(),
        "friction": {
            "subjects": r.subjects.len(),
            "baseline": {"step_ups_per_subject_per_day": base_rate, "share_prompted": base_share},
            "candidate": {"step_ups_per_subject_per_day": cand_rate, "share_prompted": cand_share},
        },
        "changes": {
            "total": r.changes.values().sum::<u64>(),
            "new_protections": protections,
            "relaxations": relaxations,
            "by_outcome": r.changes.iter().map(|((f, t), n)| json!({"from": f, "to": t, "count": n})).collect::<Vec<_>>(),
            "top_subjects": top_subjects(r).into_iter().map(|(s, n)| json!({"subject": s, "count": n})).collect::<Vec<_>>(),
            "top": top_changes(r).into_iter().map(|((what, from, to), (n, subjects))| json!({
                "request": what, "subjects": subjects.len(), "count": n,
                "from": {"outcome": from.outcome, "reason": from.reason, "rule": &*from.rule, "asks": &*from.asks},
                "to": {"outcome": to.outcome, "reason": to.reason, "rule": &*to.rule, "asks": &*to.asks},
            })).collect::<Vec<_>>(),
        },
    })
}
