//! Logs: set-up, and the one line every decision writes.
//!
//! The decision line carries outcome, rule, reason, subject and a token fingerprint, never the token.
//! STEP_UP and DENY lines are at info, ALLOW lines at debug (the metrics count every decision;
//! `--log-allow-sample` raises a share of the ALLOWs to info), so that the default log is the
//! decisions someone may want to look at, and an authorizer answering mostly ALLOW pays nothing
//! for its log.
//!
//! Text a request or a record supplies is written inert ([`Printable`]): in the text format the
//! decision's message is the one value tracing-subscriber writes as it is (its fields are quoted
//! and escaped), and a line break in it would start a line of the caller's choosing.

pub(crate) mod line;
pub mod metrics;
pub mod records;
pub mod throttle;
pub mod traces;
mod writer;

use std::{
    cell::{Cell, RefCell},
    io::{IsTerminal, Write as _},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tracing_subscriber::{EnvFilter, fmt, fmt::MakeWriter as _, prelude::*};

pub use writer::LogGuard;

use crate::{
    decision::{Decision, Outcome},
    request::Door,
};

/// One ALLOW in this many is logged at info (0: none); see [`sample_allows`].
static ALLOW_SAMPLE_EVERY: AtomicU64 = AtomicU64::new(0);

/// Logs a share (0 to 1) of the ALLOW decisions at info: one in `round(1 / share)`, counted per
/// worker thread (no counter shared between cores).
pub fn sample_allows(share: f64) {
    let every = if share > 0.0 {
        (1.0 / share).round().max(1.0) as u64
    } else {
        0
    };
    ALLOW_SAMPLE_EVERY.store(every, Ordering::Relaxed);
}

/// The level of a decision's line: info for STEP_UP, DENY and any decision with shadow outcomes;
/// for an ALLOW, info when it is one of the sampled (with the sampling period), else debug.
fn line_level(decision: &Decision) -> (tracing::Level, Option<u64>) {
    if decision.outcome != Outcome::Allow || !decision.shadow.is_empty() {
        return (tracing::Level::INFO, None);
    }
    let every = ALLOW_SAMPLE_EVERY.load(Ordering::Relaxed);
    if every == 0 {
        return (tracing::Level::DEBUG, None);
    }
    thread_local! {
        static ALLOWS: Cell<u64> = const { Cell::new(0) };
    }
    let n = ALLOWS.with(|c| {
        let n = c.get().wrapping_add(1);
        c.set(n);
        n
    });
    if n.is_multiple_of(every) {
        (tracing::Level::INFO, Some(every))
    } else {
        (tracing::Level::DEBUG, None)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Set by [`init`] with `--log-format json`: decision lines are then formatted by [`line`] and
/// appended to the same buffer as every other line.
static JSON_DECISIONS: OnceLock<writer::BufferedStderr> = OnceLock::new();

/// Installs the global subscriber, writing to stderr through a buffer (see [`writer`]). `RUST_LOG`
/// overrides `level` (e.g. `stepgate=debug`). Keep the guard until the process ends: dropping it
/// writes the lines still buffered.
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let (stderr, guard) = writer::BufferedStderr::start();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(stderr.clone()),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(stderr.clone()),
            )
            .init(),
    }
    if format == LogFormat::Json {
        let _ = JSON_DECISIONS.set(stderr);
    }
    log_panics();
    guard
}

/// Panics are logged as log lines (through the same buffer, never written to stderr by the
/// thread that panicked, which could block on a full pipe), with where they happened. The front
/// doors answer the request that panicked themselves (`500 internal_error`).
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic without a message");
        // A panic's message may quote what a caller sent (a string sliced at a bad index):
        // escaped, it cannot start a log line of the caller's.
        tracing::error!(location, "panic: {}", Printable(message));
    }));
}

/// Logs one decision and counts it in the metrics.
pub fn log_decision(door: Door, decision: &Decision, elapsed: Duration) {
    let m = metrics::global();
    m.record_decision(
        door,
        decision.outcome,
        decision.reason,
        decision.rule.as_ref(),
        elapsed,
    );
    if let Some(step_up) = &decision.step_up {
        m.record_step_up(door, decision.rule.as_ref(), step_up);
    }
    for shadow in &decision.shadow {
        m.record_shadow(shadow);
    }
    let (level, sampled) = line_level(decision);
    let enabled = if level == tracing::Level::INFO {
        tracing::enabled!(target: "stepgate::decision", tracing::Level::INFO)
    } else {
        tracing::enabled!(target: "stepgate::decision", tracing::Level::DEBUG)
    };
    if !enabled {
        return;
    }
    let principal = decision.principal.as_ref();
    let fields = line::DecisionLine {
        level: if level == tracing::Level::INFO {
            "INFO"
        } else {
            "DEBUG"
        },
        sampled,
        message: &decision.message,
        door: door.as_str(),
        outcome: decision.outcome.as_str(),
        rule: decision.rule.as_deref().unwrap_or(""),
        reason: decision.reason.as_str(),
        status: decision.http_status,
        subject: principal.map_or("", |p| &*p.subject),
        issuer: principal.map_or("", |p| &*p.issuer_id),
        token: decision.token_fingerprint.as_deref().unwrap_or(""),
        micros: elapsed.as_micros() as u64,
        shadow: (!decision.shadow.is_empty()).then(|| shadow_text(&decision.shadow)),
    };
    if let Some(out) = JSON_DECISIONS.get() {
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        LINE.with_borrow_mut(|text| {
            text.clear();
            fields.write_json(SystemTime::now(), text);
            let _ = out.make_writer().write_all(text.as_bytes());
        });
        return;
    }
    macro_rules! decision_event {
        ($level:expr) => {
            tracing::event!(
                target: "stepgate::decision",
                $level,
                door = fields.door,
                outcome = fields.outcome,
                rule = fields.rule,
                reason = fields.reason,
                status = fields.status,
                subject = fields.subject,
                issuer = fields.issuer,
                token = fields.token,
                micros = fields.micros,
                shadow = fields.shadow.as_deref(),
                sampled = fields.sampled,
                "{}", Printable(fields.message)
            )
        };
    }
    if level == tracing::Level::INFO {
        decision_event!(tracing::Level::INFO);
    } else {
        decision_event!(tracing::Level::DEBUG);
    }
}

/// Text from a request or a record, as a terminal or a text log line may show it: control
/// characters (C0, DEL, C1) and the characters that break a line or reorder it on screen
/// (U+2028, U+2029 and the bidirectional controls) are written as escapes, `\n`, `\r`, `\t` or
/// `\u{1b}`, and everything else as it is. A caller's line break then cannot start a log line, nor
/// an escape sequence retitle or rewrite the terminal that shows it. Backslashes are not doubled:
/// this is for people reading, the JSON forms are for machines.
///
/// Padding (`{:<28}`) applies to the escaped text.
#[derive(Debug, Clone, Copy)]
pub struct Printable<'a>(pub &'a str);

impl Printable<'_> {
    fn is_inert(c: char) -> bool {
        !(c.is_control()
            || matches!(
                c,
                '\u{2028}'
                    | '\u{2029}'
                    | '\u{061c}'
                    | '\u{200e}'
                    | '\u{200f}'
                    | '\u{202a}'..='\u{202e}'
                    | '\u{2066}'..='\u{2069}'
            ))
    }

    fn write_escaped(text: &str, out: &mut impl std::fmt::Write) -> std::fmt::Result {
        let mut rest = text;
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| !Self::is_inert(c)) {
            out.write_str(&rest[..at])?;
            match c {
                '\n' => out.write_str("\\n")?,
                '\r' => out.write_str("\\r")?,
                '\t' => out.write_str("\\t")?,
                c => write!(out, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        out.write_str(rest)
    }
}

impl std::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.chars().all(Self::is_inert) {
            return f.pad(self.0);
        }
        if f.width().is_none() && f.precision().is_none() {
            return Self::write_escaped(self.0, f);
        }
        let mut escaped = String::with_capacity(self.0.len() + 8);
        Self::write_escaped(self.0, &mut escaped)?;
        f.pad(&escaped)
    }
}

/// Shadow outcomes as one text: `rule:OUTCOME:reason`, comma-separated (`rule/escalate[0]` for an
/// escalation).
pub fn shadow_text(shadows: &[crate::decision::Shadow]) -> String {
    shadows
        .iter()
        .map(|s| format!("{}:{}:{}", s.name(), s.outcome.as_str(), s.reason.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A URL as logs and errors show it: its user information and its query's values masked
/// (`https://***@idp.example/keys?api_key=***`), its fragment dropped. A key set's or an
/// exporter's URL may carry a credential; the policy file is read by few, logs and traces by
/// many. A URL that parses is shown as parsed: its user information masked, a path's `@`
/// (`/jwk/sa@project.iam`) kept; one that does not is masked up to the last `@` before its
/// query (a password may hold `/` or `@`). A query item without `=` is masked too (`?SECRET`),
/// and items are split at `;` as well as `&`, as some servers split them.
pub fn url_shown(url: &str) -> String {
    let url = url.split('#').next().unwrap_or_default();
    let (before_query, query) = match url.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (url, None),
    };
    let mut shown = String::with_capacity(url.len());
    match reqwest::Url::parse(url) {
        Ok(parsed) if parsed.has_host() => {
            shown.push_str(parsed.scheme());
            shown.push_str("://");
            if !parsed.username().is_empty() || parsed.password().is_some() {
                shown.push_str("***@");
            }
            shown.push_str(parsed.host_str().unwrap_or_default());
            if let Some(port) = parsed.port() {
                shown.push_str(&format!(":{port}"));
            }
            shown.push_str(parsed.path());
        }
        _ => match before_query.rsplit_once('@') {
            Some((before, after)) => {
                if let Some((scheme, _)) = before.split_once("://") {
                    shown.push_str(scheme);
                    shown.push_str("://");
                }
                shown.push_str("***@");
                shown.push_str(after);
            }
            None => shown.push_str(before_query),
        },
    }
    if let Some(query) = query {
        shown.push('?');
        let mut rest = query;
        for item in query.split(['&', ';']) {
            match item.split_once('=') {
                Some((name, _)) => {
                    shown.push_str(name);
                    shown.push_str("=***");
                }
                None if item.is_empty() => {}
                None => shown.push_str("***"),
            }
            // The separator that ended the item, as written.
            rest = &rest[item.len()..];
            if let Some(separator) = rest.chars().next() {
                shown.push(separator);
                rest = &rest[1..];
            }
        }
    }
    shown
}

/// An error and its causes, `: `-separated, each cause once. The libraries' own messages are
/// often only the outer layer ("error sending request", "transport error"); the cause (a refused
/// certificate, a refused connection) is what an operator needs.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use super::*;

    #[test]
    fn a_url_is_shown_without_its_credentials() {
        for (url, shown) in [
            ("https://idp.example/keys", "https://idp.example/keys"),
            (
                "https://svc:p%40ss%2Fw0rd@idp.example:8443/keys?api_key=K&tenant=t#frag",
                "https://***@idp.example:8443/keys?api_key=***&tenant=***",
            ),
            ("http://collector:4317", "http://collector:4317/"),
            ("idp.example/keys?SECRET", "idp.example/keys?***"),
            (
                "https://www.googleapis.com/service_accounts/v1/jwk/sa@proj.iam.gserviceaccount.com",
                "https://www.googleapis.com/service_accounts/v1/jwk/sa@proj.iam.gserviceaccount.com",
            ),
            (
                "https://u:p@h/t/@acme?a=1;k=2&&x",
                "https://***@h/t/@acme?a=***;k=***&&***",
            ),
            ("https://u:p/w@h/keys", "https://***@h/keys"),
        ] {
            assert_eq!(super::url_shown(url), shown, "{url}");
        }
    }
    use crate::decision::Reason;

    #[test]
    fn printable_text_escapes_what_would_break_or_rewrite_a_line() {
        let shown = |text: &str| Printable(text).to_string();
        assert_eq!(shown("orders.read /api/x?q=é"), "orders.read /api/x?q=é");
        assert_eq!(shown("a\nFORGED\r\tb"), "a\\nFORGED\\r\\tb");
        assert_eq!(
            shown("\u{1b}]0;PWNED\u{7}\u{1b}[2K"),
            "\\u{1b}]0;PWNED\\u{7}\\u{1b}[2K"
        );
        assert_eq!(shown("\u{7f}\u{85}\u{9b}"), "\\u{7f}\\u{85}\\u{9b}");
        assert_eq!(
            shown("a\u{2028}b\u{202e}c\u{2066}d"),
            "a\\u{2028}b\\u{202e}c\\u{2066}d"
        );
        // A backslash is not a control character: the text stays as readable as it was.
        assert_eq!(shown("C:\\path \"x\""), "C:\\path \"x\"");
        for text in ["\u{0}", "\u{1f}", "\u{7f}", "\u{80}", "\u{9f}"] {
            assert!(shown(text).chars().all(|c| !c.is_control()), "{text:?}");
        }
    }

    #[test]
    fn printable_text_pads_what_it_shows() {
        assert_eq!(format!("[{:<6}]", Printable("ab")), "[ab    ]");
        assert_eq!(format!("[{:<6}]", Printable("a\nb")), "[a\\nb  ]");
        assert_eq!(format!("[{:>3}]", Printable("\u{1b}")), "[\\u{1b}]");
    }

    /// Captures what a text-format subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_text_decision_line_stays_one_line_whatever_its_message() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        let message = "the access token algorithm \nFORGED admin:ok\r\u{1b}[2K is not allowed";
        let decision = Decision::new(Outcome::Deny, Reason::AlgorithmNotAllowed, message, 401);
        tracing::subscriber::with_default(subscriber, || {
            log_decision(Door::Check, &decision, Duration::from_micros(5));
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with('\n') && !text.trim_end().contains(['\r', '\u{1b}']));
        assert!(
            text.contains(
                "stepgate::decision: the access token algorithm \\nFORGED admin:ok\\r\\u{1b}[2K \
                 is not allowed door=\"check\""
            ),
            "{text}"
        );
    }
}
