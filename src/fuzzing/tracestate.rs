//! The `tracestate` bound (`telemetry::traces::bounded_tracestate`, hand-written: W3C Trace
//! Context's truncation) against opentelemetry's own `TraceState` parser: the SDK reads the kept
//! value exactly when it reads each of its members on its own (the bound copies members, never
//! makes or splits one). And the bound itself: at most 512 bytes and 32
//! members, a value that fits kept as it is, a longer one cut as the specification says (members
//! over 128 bytes first, then from the end).
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
    // The twin: the bound copies members and never makes one, so the SDK reads the kept value
    // exactly when it reads each of its members on its own (within 512 bytes and 32 members, a
    // list adds nothing to refuse). The input itself may read differently: the SDK reads only
    // the first 32 members of a longer list.
    if kept.is_empty() {
        return;
    }
    let whole = TraceState::from_str(&kept);
    let each = kept.split(',').all(|m| TraceState::from_str(m).is_ok());
    assert_eq!(
        whole.is_ok(),
        each,
        "the SDK reads {kept:?} as a list: {whole:?}; each member on its own: {each}"
    );
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
