//! The B3 trace-context reader (`telemetry::traces::b3`, hand-written: no maintained B3 parser is
//! in the tree) against the B3 specification written as a regular expression: the single `b3`
//! header `{trace}-{span}[-{sampling}[-{parent}]]` and the `x-b3-*` headers, with all-zero ids
//! refused.
//!
//! Input: header lines `name: value`, as a proxy would pass them.

use regex::Regex;

use crate::telemetry::traces;

pub fn check(bytes: &[u8]) {
    let Ok(input) = std::str::from_utf8(bytes) else {
        return;
    };
    let headers: Vec<(&str, &str)> = input
        .lines()
        .filter_map(|line| line.split_once(": "))
        .collect();
    // The last value of a name, as the gRPC metadata and header readers return it.
    let get = |name: &str| {
        headers
            .iter()
            .rev()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    };
    let parsed = traces::b3(&get).map(|cx| {
        (
            cx.trace_id().to_string(),
            cx.span_id().to_string(),
            cx.is_sampled(),
        )
    });
    assert_eq!(parsed, reference(&get), "headers {input:?}");
}

/// What the B3 specification reads from these headers.
fn reference<'h>(get: &impl Fn(&str) -> Option<&'h str>) -> Option<(String, String, bool)> {
    let single =
        Regex::new("^([0-9a-f]{16}|[0-9a-f]{32})-([0-9a-f]{16})(?:-([01d])(?:-([0-9a-f]{16}))?)?$")
            .expect("a valid expression");
    let nonzero = |id: &str| id.bytes().any(|b| b != b'0');
    let widen = |trace: &str| format!("{trace:0>32}");
    if let Some(value) = get("b3") {
        let parts = single.captures(value)?;
        let (trace, span) = (&parts[1], &parts[2]);
        if !nonzero(trace) || !nonzero(span) || parts.get(4).is_some_and(|p| !nonzero(p.as_str())) {
            return None;
        }
        let sampled = matches!(parts.get(3).map(|m| m.as_str()), Some("1" | "d"));
        return Some((widen(trace), span.to_owned(), sampled));
    }
    let sampled = if get("x-b3-flags") == Some("1") {
        true
    } else {
        match get("x-b3-sampled") {
            Some("1" | "true") => true,
            None | Some("0" | "false") => false,
            Some(_) => return None,
        }
    };
    let trace = get("x-b3-traceid")?;
    let span = get("x-b3-spanid")?;
    let trace_ok = Regex::new("^(?:[0-9a-f]{16}|[0-9a-f]{32})$").expect("valid");
    let span_ok = Regex::new("^[0-9a-f]{16}$").expect("valid");
    if !trace_ok.is_match(trace) || !span_ok.is_match(span) || !nonzero(trace) || !nonzero(span) {
        return None;
    }
    Some((widen(trace), span.to_owned(), sampled))
}

/// Starting points: what Envoy's Zipkin tracer and B3 clients send, and near misses.
pub fn seeds() -> Vec<Vec<u8>> {
    [
        "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        "b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1",
        "b3: 64fe8b2a57d3eff7-e457b5a2e4d86bd1-d",
        "b3: 0",
        "b3: 80F198EE56343BA864FE8B2A57D3EFF7-E457B5A2E4D86BD1-1",
        "b3: 00000000000000000000000000000000-e457b5a2e4d86bd1-1",
        "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7\nx-b3-spanid: e457b5a2e4d86bd1\nx-b3-sampled: 1",
        "x-b3-traceid: 64fe8b2a57d3eff7\nx-b3-spanid: e457b5a2e4d86bd1\nx-b3-flags: 1",
        "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7\nx-b3-spanid: e457b5a2e4d86bd1\nx-b3-sampled: yes",
        "x-b3-traceid: 80f198ee56343ba864fe8b2a57d3eff7\nx-b3-spanid: 0000000000000000",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
