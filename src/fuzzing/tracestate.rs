//! The `tracestate` bound (`telemetry::traces::bounded_tracestate`, hand-written: W3C Trace
//! Context's truncation) against opentelemetry's own `TraceState` parser: what is kept of a
//! `tracestate` the SDK accepts, the SDK accepts too, and every member of it is one of the
//! input's. And the bound itself: at most 512 bytes, a value that fits kept as it is, a longer
//! one cut as the specification says (members over 128 bytes first, then from the end).
//!
//! Input: the header's value.

use std::str::FromStr as _;

use opentelemetry::trace::TraceState;

use crate::telemetry::traces::{MAX_TRACESTATE_BYTES, MAX_TRACESTATE_MEMBERS, bounded_tracestate};

pub fn check(bytes: &[u8]) {
    let Ok(input) = std::str::from_utf8(bytes) else {
        return;
    };
    let kept = bounded_tracestate(input);
    assert!(
        kept.len() <= MAX_TRACESTATE_BYTES,
        "{input:?} kept {kept:?}"
    );
    if input.len() <= MAX_TRACESTATE_BYTES {
        assert_eq!(kept, input, "a tracestate that fits is kept as it is");
        return;
    }
    // The specification's truncation: the members (list whitespace trimmed), those over 128
    // bytes dropped, then as many from the start as fit, 32 at most.
    let mut expected: Vec<&str> = Vec::new();
    let mut length = 0;
    for member in input
        .split(',')
        .map(|m| m.trim_matches([' ', '\t']))
        .filter(|m| !m.is_empty() && m.len() <= 128)
    {
        let more = member.len() + usize::from(!expected.is_empty());
        if length + more > MAX_TRACESTATE_BYTES || expected.len() == MAX_TRACESTATE_MEMBERS {
            break;
        }
        length += more;
        expected.push(member);
    }
    assert_eq!(kept, expected.join(","), "{input:?}");
    // The twin: a value the SDK reads gives a kept value it reads whole, member for member (the
    // SDK itself keeps the first 32 of a longer list, which the kept value never is).
    if TraceState::from_str(input).is_ok() && !kept.is_empty() {
        let part = TraceState::from_str(&kept)
            .unwrap_or_else(|e| panic!("the SDK read {input:?} but refuses {kept:?}: {e}"));
        let mut seen = std::collections::HashSet::new();
        for member in kept.split(',') {
            let (key, value) = member
                .split_once('=')
                .expect("the SDK read it as key=value");
            // A key given twice (which the SDK does not refuse) reads as its first value.
            if seen.insert(key) {
                assert_eq!(part.get(key), Some(value), "{key} of {kept:?}");
            }
        }
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let long_member = format!("long={}", "v".repeat(200));
    let many: Vec<String> = (0..60).map(|i| format!("m{i:02}=value{i:02}")).collect();
    [
        "congo=t61rcWkgMzE".to_owned(),
        "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".to_owned(),
        format!("a={}", "x".repeat(MAX_TRACESTATE_BYTES - 2)),
        format!("{} , {long_member},\t{}", many[0], many[1..].join(",")),
        (0..32)
            .map(|i| format!("k{i:02}{}={}", "a".repeat(250), "v".repeat(253)))
            .collect::<Vec<_>>()
            .join(","),
        format!("{},,{}", many[..30].join(", "), many[30..].join(" ,")),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
