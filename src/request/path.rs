//! The path rules match against: the request target without its query, with percent-encoded
//! unreserved characters decoded, path parameters (`;…`) cut from each segment, dot segments removed
//! and repeated slashes merged (RFC 3986 §6.2.2).
//!
//! Matching the path exactly as sent would let `/public/../admin`, `/%61dmin` or `/admin;x=1` slip
//! past an `/admin/**` rule while the upstream, which normalises (Tomcat and Spring drop `;…`
//! parameters, and treat `..;` as `..`), serves `/admin`. Encoded slashes, backslashes and control
//! characters have no single meaning across servers, so such paths are refused outright.

use std::borrow::Cow;

/// Why a path could not be normalised safely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// `%2F`, `%5C` or a raw backslash: upstreams disagree about what they mean.
    AmbiguousSeparator,
    /// A control character, raw or encoded (`%00`, `%0A`, …).
    ControlCharacter,
    /// A `%` not followed by two hex digits, or bytes that are not UTF-8 once decoded.
    BadEncoding,
    /// Not origin-form (`/…`).
    NotAbsolute,
}

impl PathProblem {
    pub fn describe(self) -> &'static str {
        match self {
            Self::AmbiguousSeparator => "the path contains an encoded slash or a backslash",
            Self::ControlCharacter => "the path contains a control character",
            Self::BadEncoding => "the path has invalid percent-encoding",
            Self::NotAbsolute => "the path does not start with /",
        }
    }
}

/// Splits a request target into its normalised path (for matching) and its raw query. A path
/// already in normal form (the usual case) is borrowed, not copied.
pub fn normalize(target: &str) -> Result<(Cow<'_, str>, &str), PathProblem> {
    let target = target.split('#').next().unwrap_or(target);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return Err(PathProblem::NotAbsolute);
    }
    if is_normal(path) {
        return Ok((Cow::Borrowed(path), query));
    }
    if path.contains('\\') {
        return Err(PathProblem::AmbiguousSeparator);
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(PathProblem::ControlCharacter);
    }
    Ok((Cow::Owned(resolve(path)?), query))
}

/// Decodes unreserved escapes, cuts path parameters, removes dot segments and merges slashes.
fn resolve(path: &str) -> Result<String, PathProblem> {
    let decoded = decode_unreserved(path)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        let segment = segment.split(';').next().unwrap_or(segment);
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

/// Whether `path` (absolute, without query) is already what [`normalize`] would make of it: only
/// visible ASCII without `%`, `;` or `\\`, and no empty (but a trailing), `.` or `..` segment.
/// Nearly every request's path is; this saves the decoding and re-assembly.
fn is_normal(path: &str) -> bool {
    let plain = |b: &u8| matches!(b, 0x21..=0x7e) && !matches!(b, b'%' | b';' | b'\\');
    if !path.as_bytes().iter().all(plain) {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "." || segment == ".." || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// Decodes `%XX` escapes of unreserved characters and keeps other escapes as they are (upper-cased),
/// so that `%61` and `a` compare equal but `%3F` stays distinct from `?`.
fn decode_unreserved(path: &str) -> Result<String, PathProblem> {
    if !path.contains('%') {
        return Ok(path.to_owned());
    }
    let bytes = path.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = bytes.get(i + 1..i + 3).ok_or(PathProblem::BadEncoding)?;
        let text = std::str::from_utf8(hex).map_err(|_| PathProblem::BadEncoding)?;
        let byte = u8::from_str_radix(text, 16).map_err(|_| PathProblem::BadEncoding)?;
        match byte {
            b'/' | b'\\' => return Err(PathProblem::AmbiguousSeparator),
            b if b.is_ascii_control() => return Err(PathProblem::ControlCharacter),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => out.push(b),
            _ => out.extend_from_slice(format!("%{byte:02X}").as_bytes()),
        }
        i += 3;
    }
    String::from_utf8(out).map_err(|_| PathProblem::BadEncoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(target: &str) -> String {
        normalize(target).unwrap().0.into_owned()
    }

    #[test]
    fn strips_the_query_and_keeps_it() {
        assert_eq!(
            normalize("/payments/wire?dry_run=1"),
            Ok((Cow::Borrowed("/payments/wire"), "dry_run=1"))
        );
        assert_eq!(normalize("/a#frag"), Ok((Cow::Borrowed("/a"), "")));
        // Only a path that needs rewriting is copied.
        assert!(matches!(normalize("/a/./b").unwrap().0, Cow::Owned(p) if p == "/a/b"));
    }

    #[test]
    fn removes_dot_segments_and_merges_slashes() {
        assert_eq!(path("/public/../admin/users"), "/admin/users");
        assert_eq!(path("//admin//./users/"), "/admin/users/");
        assert_eq!(path("/../../etc"), "/etc");
        assert_eq!(path("/"), "/");
        assert_eq!(path("/.."), "/");
    }

    #[test]
    fn decodes_unreserved_escapes_only() {
        assert_eq!(path("/%61dmin"), "/admin");
        assert_eq!(path("/%2e%2e/admin"), "/admin");
        assert_eq!(path("/a%3fb"), "/a%3Fb");
    }

    #[test]
    fn cuts_path_parameters_like_servlet_containers() {
        assert_eq!(path("/payments/wire;x=1"), "/payments/wire");
        assert_eq!(path("/payments;x=1/wire"), "/payments/wire");
        assert_eq!(path("/public/..;/admin"), "/admin");
        assert_eq!(path("/a;jsessionid=1/"), "/a/");
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_normalisation() {
        let alphabet = ["/", "a", "B", ".", "..", "%61", ";x", "~", "-", " ", "é"];
        // Every path of up to four pieces from the alphabet, starting with a slash.
        let mut paths = vec!["/".to_owned()];
        for _ in 0..4 {
            let longer: Vec<String> = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |a| format!("{p}{a}")))
                .collect();
            paths.extend(longer);
        }
        paths.sort();
        paths.dedup();
        for p in &paths {
            if is_normal(p) {
                assert_eq!(resolve(p).as_deref(), Ok(p.as_str()), "{p:?}");
            }
        }
        assert!(is_normal("/payments/wire"));
        assert!(is_normal("/a/"));
        assert!(!is_normal("/a//b"));
        assert!(!is_normal("/a/./b"));
        assert!(!is_normal("/a/.."));
    }

    #[test]
    fn refuses_ambiguous_or_broken_paths() {
        assert_eq!(
            normalize("/payments/wire%00"),
            Err(PathProblem::ControlCharacter)
        );
        assert_eq!(normalize("/a%0a"), Err(PathProblem::ControlCharacter));
        assert_eq!(normalize("/a\u{7f}"), Err(PathProblem::ControlCharacter));
        assert_eq!(
            normalize("/admin%2Fusers"),
            Err(PathProblem::AmbiguousSeparator)
        );
        assert_eq!(
            normalize("/admin%5cusers"),
            Err(PathProblem::AmbiguousSeparator)
        );
        assert_eq!(
            normalize("/admin\\users"),
            Err(PathProblem::AmbiguousSeparator)
        );
        assert_eq!(normalize("/a%zz"), Err(PathProblem::BadEncoding));
        assert_eq!(normalize("/a%"), Err(PathProblem::BadEncoding));
        assert_eq!(normalize("admin"), Err(PathProblem::NotAbsolute));
    }
}
