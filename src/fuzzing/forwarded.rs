//! The hosts a `Forwarded` header names (`request::forwarded_hosts`), which a host rule is held
//! to: every host the lenient readers take must be among them. The twin is the regex that
//! Spring's `ForwardedHeaderUtils` and Quarkus's forwarded parser apply to the value,
//! `(?i:host)="?([^;,"]+)"?` (ASCII letters in either case), at every place it matches (they take
//! the first element's or the first match: a subset), its value with surrounding spaces left
//! out; and for a value with no `host=` at all, no host.
//!
//! Input: a header value.

use std::sync::OnceLock;

use regex::Regex;

pub fn check(bytes: &[u8]) {
    let Ok(value) = std::str::from_utf8(bytes) else {
        return;
    };
    let found: Vec<&str> = crate::request::forwarded_hosts(value).collect();
    // `(?i:host)` in Java folds ASCII only, as `forwarded_hosts` does.
    static TWIN: OnceLock<Regex> = OnceLock::new();
    let twin =
        TWIN.get_or_init(|| Regex::new(r#"[hH][oO][sS][tT]="?([^;,"]+)"?"#).expect("a regex"));
    // Every start of a match, not only the leftmost non-overlapping ones.
    for start in 0..value.len() {
        if !value.is_char_boundary(start) {
            continue;
        }
        let Some(captures) = twin.captures_at(value, start) else {
            break;
        };
        if captures.get(0).expect("the whole match").start() != start {
            continue;
        }
        let host = captures[1].trim_matches(|c: char| c.is_ascii_whitespace());
        assert!(
            host.is_empty() || found.contains(&host),
            "Forwarded {value:?}: the host {host:?} a lenient reader takes is not among {found:?}"
        );
    }
    if !value.to_ascii_lowercase().contains("host=") {
        assert!(
            found.is_empty(),
            "Forwarded {value:?}: {found:?} without a host="
        );
    }
    for host in &found {
        assert!(
            !host.is_empty() && !host.contains([';', ',', '"']),
            "Forwarded {value:?}: {host:?}"
        );
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    [
        "host=api.example.com",
        "for=192.0.2.60;proto=http;by=203.0.113.43",
        "For=\"[2001:db8:cafe::17]:4711\";Host=\"admin.example.com\"",
        "host=a, host=b;proto=https",
        "host= spaced ;host=\"quoted\\\"escape\"",
        "xhost=evil;host=host=a",
        "HOST=\"\";host=",
        "for=\"host=inside.quotes\"",
        "hostÅ=é;host=ü.example",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
