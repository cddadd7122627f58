//! Path normalisation (`request::path`) by its properties, as there is no library to compare
//! with: a normalised path is in normal form (normalising it again changes nothing), holds no
//! ambiguous segment (no `.`, `..`, parameters, repeated slash, encoded separator or percent),
//! never climbs above the root, and means what the request meant: fully decoded, it is the
//! request's path fully decoded (and, when stripping, parameters cut). What upstreams read two
//! ways is never accepted: an empty segment before the last, an escape of a letter or digit.

use crate::request::path::{PathParameters, normalize};

pub fn check(bytes: &[u8]) {
    let Ok(target) = std::str::from_utf8(bytes) else {
        return;
    };
    let refused = normalize(target, PathParameters::Refuse);
    let stripped = normalize(target, PathParameters::Strip);
    if let Ok((path, query)) = &refused {
        assert_eq!(
            stripped.as_ref().map(|(p, q)| (p.as_ref(), *q)),
            Ok((path.as_ref(), *query)),
            "a path without parameters reads the same in both modes: {target:?}"
        );
    }
    for (parameters, result) in [
        (PathParameters::Refuse, refused),
        (PathParameters::Strip, stripped),
    ] {
        let Ok((path, query)) = result else {
            continue;
        };
        assert!(path.starts_with('/'), "{target:?} → {path:?}");
        assert!(!target.contains('#'), "a fragment is refused: {target:?}");
        assert_eq!(
            normalize(&path, parameters).map(|(p, q)| (p.into_owned(), q)),
            Ok((path.to_string(), "")),
            "normalising {target:?} → {path:?} again changes it"
        );
        assert!(!path.contains("//"), "{target:?} → {path:?}");
        assert!(
            !path.contains(['\\', ';', '?', '#']),
            "{target:?} → {path:?}"
        );
        assert!(!path.chars().any(char::is_control), "{target:?} → {path:?}");
        assert!(
            path.split('/').all(|s| s != "." && s != ".."),
            "a dot segment survives: {target:?} → {path:?}"
        );
        for (at, _) in path.match_indices('%') {
            let escape = &path[at..(at + 3).min(path.len())];
            assert!(
                matches!(escape, "%3F" | "%23" | "%3B"),
                "escape {escape:?} survives: {target:?} → {path:?}"
            );
        }
        let (original, expected_query) = target.split_once('?').unwrap_or((target, ""));
        assert_eq!(query, expected_query, "{target:?}");
        let segments: Vec<&str> = original.split('/').skip(1).collect();
        assert!(
            segments[..segments.len() - 1].iter().all(|s| !s.is_empty()),
            "an empty segment is accepted: {target:?}"
        );
        assert!(
            !escapes(original).any(|b| b.is_ascii_alphanumeric()),
            "an escape of a letter or digit is accepted: {target:?}"
        );
        assert_eq!(
            decode_all(&path),
            meaning(original, parameters == PathParameters::Strip),
            "normalising changed what {target:?} names: {path:?}"
        );
    }
}

/// What `path` names once every escape is decoded: segments (parameters cut when `strip`), a
/// trailing slash kept (an accepted path has no other empty segment).
fn meaning(path: &str, strip: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for segment in path.split('/') {
        let name = if strip {
            segment.split(';').next().unwrap_or(segment)
        } else {
            segment
        };
        if !name.is_empty() {
            out.push(b'/');
            out.extend(decode_all(name));
        }
    }
    if out.is_empty() || path.ends_with('/') {
        out.push(b'/');
    }
    out
}

/// The bytes `%XX` escapes in `text` stand for.
fn escapes(text: &str) -> impl Iterator<Item = u8> + '_ {
    text.match_indices('%').filter_map(|(at, _)| {
        let hex = text.get(at + 1..at + 3)?;
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| u8::from_str_radix(hex, 16).ok())?
    })
}

/// Every `%XX` escape decoded (the rest as it is).
fn decode_all(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 3).and_then(|hex| {
            let hex = std::str::from_utf8(hex).ok()?;
            hex.bytes()
                .all(|b| b.is_ascii_hexdigit())
                .then(|| u8::from_str_radix(hex, 16).ok())?
        });
        match (bytes[i], escape) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

/// Starting points for the fuzzer: ordinary paths and the spellings servers read differently.
pub fn seeds() -> Vec<Vec<u8>> {
    [
        "/",
        "/payments/wire?dry_run=1#f",
        "//admin//users/",
        "/%61dmin/%C3%A9t%c3%a9",
        "/a%20b/%C3%A9t%c3%a9/",
        "/admin/..;/healthz",
        "/x/;/../y",
        "/a/%2e%2e/b",
        "/a;jsessionid=1/b;x=2",
        "/a%2Fb%5c%25%3F%23%3B",
        "/a%00%0a%C2%85",
        "/.well-known/a..b/...",
        "admin",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
