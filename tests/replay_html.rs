//! `stepgate replay --html` opened in a real headless browser (Debian's `chromium`, installed by
//! `scripts/setup-peers`): the page's charts render (a bar chart per rule with visible bars, the
//! step-up rate's two lines, all with a size), and the page makes no network request — checked in
//! Chromium's own network log, whose detector is first shown to catch a page that does.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::{TempPolicy, bin, demo_policy_text};
use serde_json::Value;

fn chromium() -> PathBuf {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(candidate).is_file() {
            return candidate.into();
        }
    }
    panic!(
        "chromium is not installed: run scripts/setup-peers (it installs the Debian package \
         chromium), or `apt-get install chromium`"
    );
}

/// Runs headless Chromium on `page` with `extra` flags; its stdout.
fn run_chromium(page: &Path, extra: &[String]) -> String {
    let profile = page.parent().unwrap().join("chromium-profile");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("running chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// URLs other than `file:` that the page itself asked for (Chromium's own background requests
/// have no origin; a `file:` page's requests have the origin "null").
fn page_requests(page: &Path) -> Vec<String> {
    let log = page.with_extension("netlog.json");
    let _ = std::fs::remove_file(&log);
    run_chromium(
        page,
        &[
            format!("--log-net-log={}", log.display()),
            "--dump-dom".into(),
        ],
    );
    let text = std::fs::read_to_string(&log).expect("chromium wrote its network log");
    let netlog: Value = serde_json::from_str(&text).expect("a JSON network log");
    let start_job = netlog["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        .as_i64()
        .expect("the log names its event types");
    netlog["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_i64() == Some(start_job))
        .filter(|e| e["params"]["initiator"] == "null")
        .filter_map(|e| e["params"]["url"].as_str())
        .filter(|url| !url.starts_with("file:"))
        .map(str::to_owned)
        .collect()
}

fn records() -> String {
    let mut out = String::new();
    for i in 0..600 {
        let hour = i / 100;
        let minute = i % 60;
        let acrs = if i % 3 == 0 { "[\"c1\"]" } else { "[]" };
        out.push_str(&format!(
            "{{\"time\":\"2026-12-01T{hour:02}:{minute:02}:00Z\",\"door\":\"check\",\"method\":\"GET\",\"host\":\"a\",\"path\":\"/api/x/{i}\",\
             \"token\":{{\"issuer\":\"demo-entra\",\"subject\":\"user-{}\",\"acrs\":{acrs},\"auth_time\":1796083200,\"scopes\":[\"user_impersonation\"],\"xms_cc\":[\"cp1\"]}},\
             \"outcome\":\"ALLOW\",\"reason\":\"allowed\",\"status\":200,\"rule\":\"everything-else\"}}\n",
            i % 40
        ));
    }
    out.push_str("{\"time\":\"2026-12-01T00:00:00Z\",\"door\":\"check\",\"method\":\"GET\",\"path\":\"/healthz\",\"outcome\":\"ALLOW\",\"reason\":\"anonymous_allowed\",\"status\":200,\"rule\":\"health\"}\n");
    out
}

#[test]
fn the_report_renders_its_charts_in_a_browser_and_fetches_nothing() {
    let policy = TempPolicy::new(
        "replay-html",
        &common::edit(
            &demo_policy_text(),
            "    require: { authenticated: true }\n",
            "    require: { auth_contexts: [c1] }\n",
        ),
    );
    let dir = policy.path.parent().unwrap().to_owned();
    std::fs::write(dir.join("records.jsonl"), records()).unwrap();
    let html = dir.join("report.html");
    let out = Command::new(bin())
        .args(["replay", "--records"])
        .arg(dir.join("records.jsonl"))
        .arg("--policy")
        .arg(&policy.path)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no address in the page"
    );

    // The detector catches a page that fetches something…
    let leaky = dir.join("leaky.html");
    std::fs::write(
        &leaky,
        "<!DOCTYPE html><img src=\"http://127.0.0.1:9/probe.png\">",
    )
    .unwrap();
    assert_eq!(page_requests(&leaky), ["http://127.0.0.1:9/probe.png"]);
    // … and the report fetches nothing.
    assert_eq!(page_requests(&html), Vec::<String>::new());

    // Layout, measured in the browser: a copy of the page with a script that writes the charts'
    // sizes into the document (the report itself runs no script).
    let measured = dir.join("measured.html");
    let script = "<script>\
        const size = e => { const r = e.getBoundingClientRect(); return [Math.round(r.width), Math.round(r.height)]; };\
        const out = {\
          charts: [...document.querySelectorAll('svg.rule-chart')].map(e => [e.dataset.rule, size(e)]),\
          bars: [...document.querySelectorAll('svg.rule-chart rect.bar')].map(size),\
          rate: size(document.getElementById('step-up-rate')),\
          lines: [...document.querySelectorAll('polyline.rate-line')].map(size)\
        };\
        document.getElementById('layout').textContent = JSON.stringify(out);\
        </script>";
    let with_script = page
        .replace(
            "default-src 'none'; style-src 'unsafe-inline'",
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
        )
        .replace(
            "</body>",
            &format!("<pre id=\"layout\"></pre>{script}</body>"),
        );
    std::fs::write(&measured, with_script).unwrap();
    let dom = run_chromium(&measured, &["--dump-dom".into()]);
    let json = dom
        .split("<pre id=\"layout\">")
        .nth(1)
        .and_then(|rest| rest.split("</pre>").next())
        .expect("the measuring script ran")
        .replace("&quot;", "\"");
    let layout: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    let charts = layout["charts"].as_array().unwrap();
    let rules: Vec<&str> = charts.iter().map(|c| c[0].as_str().unwrap()).collect();
    assert_eq!(rules, ["everything-else", "health"]);
    for chart in charts {
        assert!(
            chart[1][0].as_i64().unwrap() > 100 && chart[1][1].as_i64().unwrap() > 20,
            "{chart}"
        );
    }
    let bars = layout["bars"].as_array().unwrap();
    assert!(
        bars.len() >= 5,
        "baseline ALLOW, candidate ALLOW and STEP_UP, and health's: {bars:?}"
    );
    assert!(
        bars.iter()
            .all(|b| b[0].as_i64().unwrap() > 0 && b[1].as_i64().unwrap() > 0)
    );
    assert!(layout["rate"][0].as_i64().unwrap() > 300, "{layout}");
    let lines = layout["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 2);
    assert!(
        lines.iter().all(|l| l[0].as_i64().unwrap() > 100),
        "{lines:?}"
    );
}
