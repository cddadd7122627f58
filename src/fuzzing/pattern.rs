//! The matchers' pattern languages (`policy::pattern`) against the same patterns written as
//! regular expressions: `Wildcard` (operations, hosts) on any text, `PathGlob` on any path, with
//! the glob's work bounded by (path segments + 1) × (pattern segments + 1) comparisons.
//!
//! Input: the pattern, a newline, then the text or path to match.

use regex::Regex;

use crate::policy::pattern::{GlobSegment, PathGlob, Wildcard};

pub fn check(bytes: &[u8]) {
    let Ok(input) = std::str::from_utf8(bytes) else {
        return;
    };
    let (pattern, text) = input.split_once('\n').unwrap_or((input, "/"));
    check_wildcard(pattern, text);
    check_glob(pattern, text);
}

fn check_wildcard(pattern: &str, text: &str) {
    let wildcard = Wildcard::new(pattern);
    let parts: Vec<String> = wildcard.parts.iter().map(|p| regex::escape(p)).collect();
    let Ok(reference) = Regex::new(&format!("(?s)^{}$", parts.join(".*"))) else {
        return;
    };
    assert_eq!(
        wildcard.matches(text),
        reference.is_match(text),
        "wildcard {pattern:?} on {text:?}"
    );
}

fn check_glob(pattern: &str, path: &str) {
    let Ok(glob) = PathGlob::new(pattern) else {
        return;
    };
    let path = path.to_ascii_lowercase();
    let (matched, steps) = glob.matches_counting(&path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let pattern_len = glob.segments().count();
    assert!(
        steps <= (segments.len() + 1) * (pattern_len + 1),
        "glob {pattern:?} on {path:?}: {steps} steps for {} segments",
        segments.len()
    );
    let mut expression = String::from("(?s)^");
    for segment in glob.segments() {
        match segment {
            GlobSegment::Literal(literal) => {
                expression.push('/');
                expression.push_str(&regex::escape(literal));
            }
            GlobSegment::Wild(parts) => {
                let parts: Vec<String> = parts.iter().map(|p| regex::escape(p)).collect();
                expression.push('/');
                expression.push_str(&parts.join("[^/]*"));
            }
            GlobSegment::Any => expression.push_str("(?:/[^/]+)*"),
        }
    }
    expression.push('$');
    let Ok(reference) = Regex::new(&expression) else {
        return;
    };
    let canonical: String = segments.iter().map(|s| format!("/{s}")).collect();
    assert_eq!(
        matched,
        reference.is_match(&canonical),
        "glob {pattern:?} on {path:?} (regex {expression:?})"
    );
}

/// Starting points for the fuzzer: globs and wildcards of the demo policy, and the double-star
/// patterns a backtracking matcher takes exponential time on.
pub fn seeds() -> Vec<Vec<u8>> {
    let slow = format!("/**/a/**/a/**/z\n{}", "/a".repeat(40));
    [
        "/admin/**\n/admin/users/42",
        "/payments/*/approve\n/payments/42/approve",
        "/customers/*/pii\n/customers/7/pii/",
        "/v1/*.json\n/v1/a.json",
        "*.example.com\napi.example.com",
        "payments.*\npayments.wire_transfer",
        "a*b*c\naXXcYYbZZc",
        "/**\n/",
        slow.as_str(),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
