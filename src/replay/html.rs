//! The replay report as one self-contained HTML page: inline CSS and SVG, no script from
//! elsewhere, no font, no image, nothing fetched (its Content-Security-Policy forbids it). A
//! before/after bar per rule and the step-up rate over time.

use std::fmt::Write as _;

use super::{Replay, Tally, report};

const ALLOW: &str = "#3b8f5a";
const STEP_UP: &str = "#d99a1e";
const DENY: &str = "#c2453d";

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Two stacked bars (baseline, candidate) split by outcome, scaled to the larger total.
fn rule_chart(out: &mut String, rule: &str, t: &[Tally; 2]) {
    let (width, bar, gap) = (560.0, 22.0, 10.0);
    let max = t[0].total().max(t[1].total()).max(1) as f64;
    let _ = write!(
        out,
        "<svg class=\"rule-chart\" data-rule=\"{}\" width=\"{}\" height=\"{}\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"{} before and after\">",
        escape(rule),
        width + 150.0,
        2.0 * bar + gap + 4.0,
        width + 150.0,
        2.0 * bar + gap + 4.0,
        escape(rule)
    );
    for (side, (label, tally)) in [("baseline", &t[0]), ("candidate", &t[1])]
        .iter()
        .enumerate()
    {
        let y = 2.0 + side as f64 * (bar + gap);
        let _ = write!(
            out,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{label}</text>",
            y + bar * 0.7
        );
        let mut x = 80.0;
        for (n, color, name) in [
            (tally.allow, ALLOW, "ALLOW"),
            (tally.step_up, STEP_UP, "STEP_UP"),
            (tally.deny, DENY, "DENY"),
        ] {
            let w = width * n as f64 / max;
            if n > 0 {
                let _ = write!(
                    out,
                    "<rect class=\"bar\" x=\"{x:.1}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar}\" fill=\"{color}\"><title>{label}: {n} {name}</title></rect>",
                    w.max(1.0)
                );
            }
            x += w;
        }
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\">{}</text>",
            x + 6.0,
            y + bar * 0.7,
            tally.total()
        );
    }
    out.push_str("</svg>");
}

/// Step-ups per request, per hour, for both sides.
fn rate_chart(out: &mut String, r: &Replay) {
    let (width, height, left, bottom) = (720.0, 220.0, 50.0, 30.0);
    let hours: Vec<i64> = r.requests_by_hour.keys().copied().collect();
    let _ = write!(
        out,
        "<svg id=\"step-up-rate\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"step-up rate over time\">"
    );
    let plot_w = width - left - 10.0;
    let plot_h = height - bottom - 10.0;
    let _ = write!(
        out,
        "<line x1=\"{left}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"#888\"/><line x1=\"{left}\" y1=\"10\" x2=\"{left}\" y2=\"{y}\" stroke=\"#888\"/>",
        y = 10.0 + plot_h,
        x2 = left + plot_w
    );
    let rates: Vec<[f64; 2]> = hours
        .iter()
        .map(|h| {
            let requests = r.requests_by_hour[h].max(1) as f64;
            let ups = r.step_ups_by_hour.get(h).copied().unwrap_or_default();
            [ups[0] as f64 / requests, ups[1] as f64 / requests]
        })
        .collect();
    let top = rates
        .iter()
        .flat_map(|r| r.iter().copied())
        .fold(0.01, f64::max);
    let _ = write!(
        out,
        "<text x=\"2\" y=\"16\" font-size=\"11\">{:.0}%</text><text x=\"2\" y=\"{}\" font-size=\"11\">0%</text>",
        100.0 * top,
        10.0 + plot_h
    );
    for (side, color, name) in [(0, "#6a7fb5", "baseline"), (1, "#d9532b", "candidate")] {
        let points: Vec<String> = rates
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let x = left + plot_w * i as f64 / (rates.len().max(2) - 1) as f64;
                let y = 10.0 + plot_h * (1.0 - r[side] / top);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let points = if points.len() == 1 {
            // One hour: a flat segment, so that the line has a length.
            let y = points[0].split(',').nth(1).unwrap_or("0").to_owned();
            format!("{left},{y} {},{y}", left + plot_w)
        } else {
            points.join(" ")
        };
        let _ = write!(
            out,
            "<polyline class=\"rate-line\" data-side=\"{name}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{points}\"/>"
        );
    }
    let _ = write!(
        out,
        "<text x=\"{left}\" y=\"{}\" font-size=\"11\">{} hour(s) of records</text></svg>",
        height - 8.0,
        hours.len()
    );
}

/// The whole page.
pub fn page(r: &Replay, baseline_name: &str, candidate_name: &str) -> String {
    let mut out = String::new();
    out.push_str(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>stepgate replay</title><style>\
         body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:960px}\
         table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
         th:first-child,td:first-child{text-align:left}.key span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}\
         section{margin-bottom:28px}</style></head><body>",
    );
    let (protections, relaxations) = report::protections_and_relaxations(r);
    let (base_rate, base_share) = report::friction(r, 0);
    let (cand_rate, cand_share) = report::friction(r, 1);
    let _ = write!(
        out,
        "<h1>What the candidate would change</h1>\
         <p>Candidate <code>{}</code> against {}: {} records replayed; signatures are not verified again (each record holds what verification established); {} kept as recorded; {} unreadable line(s).</p>",
        escape(candidate_name),
        escape(baseline_name),
        r.records,
        r.as_recorded,
        r.bad_line_count
    );
    let _ = write!(
        out,
        "<section id=\"friction\"><h2>Friction</h2><table><tr><th></th><th>baseline</th><th>candidate</th></tr>\
         <tr><td>step-ups per subject per day</td><td>{base_rate:.2}</td><td>{cand_rate:.2}</td></tr>\
         <tr><td>subjects prompted at least once</td><td>{:.1}%</td><td>{:.1}%</td></tr>\
         <tr><td>STEP_UP answers</td><td>{}</td><td>{}</td></tr></table>\
         <p>{} subjects. {} request(s) answered differently: <b>{protections}</b> new protection(s) (ALLOW → STEP_UP or DENY), <b>{relaxations}</b> relaxation(s) (→ ALLOW).</p></section>",
        100.0 * base_share,
        100.0 * cand_share,
        r.step_ups[0],
        r.step_ups[1],
        r.subjects.len(),
        r.changes.values().sum::<u64>()
    );
    let _ = write!(
        out,
        "<section id=\"rules\"><h2>Per rule, before and after</h2><p class=\"key\"><span style=\"background:{ALLOW}\"></span>ALLOW<span style=\"background:{STEP_UP}\"></span>STEP_UP<span style=\"background:{DENY}\"></span>DENY</p>"
    );
    for (rule, t) in &r.per_rule {
        let name = if rule.is_empty() { "(no rule)" } else { rule };
        let _ = write!(out, "<h3>{}</h3>", escape(name));
        rule_chart(&mut out, name, t);
    }
    out.push_str("</section><section id=\"rate\"><h2>Step-up rate over time</h2>");
    rate_chart(&mut out, r);
    out.push_str(
        "<p class=\"key\"><span style=\"background:#6a7fb5\"></span>baseline<span style=\"background:#d9532b\"></span>candidate</p></section>",
    );
    out.push_str(
        "<section id=\"changes\"><h2>Most frequent changed requests</h2><table><tr><th>request</th><th>subjects</th><th>count</th><th>baseline</th><th>candidate</th></tr>",
    );
    let asking = |answer: &super::Answer| {
        if answer.asks.is_empty() {
            String::new()
        } else {
            format!(" (asking {})", escape(&answer.asks))
        }
    };
    for ((what, from, to), (n, subjects)) in report::top_changes(r) {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{n}</td><td>{} {}{}</td><td>{} {}{}</td></tr>",
            escape(what),
            subjects.len(),
            from.outcome,
            escape(from.reason),
            asking(from),
            to.outcome,
            escape(to.reason),
            asking(to)
        );
    }
    out.push_str("</table><h3>Subjects most often answered differently (hashed)</h3><table><tr><th>subject</th><th>count</th></tr>");
    for (subject, n) in report::top_subjects(r) {
        let _ = write!(out, "<tr><td>{}</td><td>{n}</td></tr>", escape(&subject));
    }
    out.push_str("</table></section></body></html>\n");
    out
}
