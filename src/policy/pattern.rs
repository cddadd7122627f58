//! The small pattern languages of matchers, compiled once at load: `*` wildcards for operations and
//! hosts, and segment globs (`*` within a segment, `**` across segments) for paths.

use crate::request::path;

/// A matcher's host pattern (lower case): a [`Wildcard`], and whether it names a port
/// (`host:8443`, `host:*`, `[::1]:80`) or ends in a dot, and so is matched against the host as the
/// proxy routes it — told once here, not on every request. An unbracketed IPv6 literal (`::1`)
/// names no port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    pub wildcard: Wildcard,
    pub as_routed: bool,
}

impl HostPattern {
    pub fn new(pattern: &str) -> Self {
        // `[2001:db8::1]`, as Envoy's virtual hosts write an IPv6 host: a request's host is
        // compared without its brackets when no port is named.
        if let Some(inner) = pattern
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            return Self {
                wildcard: Wildcard::new(inner),
                as_routed: false,
            };
        }
        let port = match pattern.strip_prefix('[') {
            Some(rest) => rest
                .split_once(']')
                .is_some_and(|(_, after)| after.starts_with(':')),
            None => pattern.bytes().filter(|&b| b == b':').count() == 1,
        };
        Self {
            wildcard: Wildcard::new(pattern),
            as_routed: port || pattern.ends_with('.'),
        }
    }

    pub fn as_str(&self) -> &str {
        self.wildcard.as_str()
    }

    pub fn matches(&self, host: &str) -> bool {
        self.wildcard.matches(host)
    }
}

/// A pattern where `*` matches any run of characters (including none). No other metacharacters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wildcard {
    source: String,
    /// The literal runs between `*`s (one part when there is none).
    pub(crate) parts: Vec<String>,
    exact: bool,
}

impl Wildcard {
    pub fn new(pattern: &str) -> Self {
        Self {
            source: pattern.to_owned(),
            parts: pattern.split('*').map(str::to_owned).collect(),
            exact: !pattern.contains('*'),
        }
    }

    /// A wildcard that matches ASCII-lower-cased text (the caller lowers the text); `as_str` keeps
    /// the pattern as written.
    pub fn ignoring_case(pattern: &str) -> Self {
        Self {
            source: pattern.to_owned(),
            ..Self::new(&pattern.to_ascii_lowercase())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, text: &str) -> bool {
        if self.exact {
            return self.parts[0] == text;
        }
        let (first, rest) = self
            .parts
            .split_first()
            .expect("split yields at least one part");
        let Some(mut remaining) = text.strip_prefix(first.as_str()) else {
            return false;
        };
        let (last, middle) = rest
            .split_last()
            .expect("a pattern with * has two parts or more");
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(i) => remaining = &remaining[i + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Wild(Wildcard),
    /// `**`: zero or more whole segments.
    Any,
}

/// A path glob such as `/payments/*/approve` or `/admin/**`, matched segment by segment against a
/// normalised path: in ASCII lower case ([`Self::matches`]), as upstreams such as ASP.NET Core
/// route paths regardless of case, so `/ADMIN` must not slip past an `/admin/**` rule; or in the
/// case of each, as written and as sent ([`Self::matches_in_case`]), as Go, Flask or Spring
/// route them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGlob {
    source: String,
    segments: Vec<Segment>,
    /// Where the segments after the last `**` begin (0 without `**`): those must match the
    /// path's last segments, one each, which is checked first, from the end.
    tail: usize,
    /// The glob in its own case, when that differs from lower case (else `segments` are it).
    in_case: Option<Box<PathGlob>>,
    /// It has upper-case letters outside the escapes normalisation writes in upper case
    /// (`%3F`), which request paths have in the same case.
    letters_in_case: bool,
    /// It has a letter outside ASCII that has another case (`é`), once decoded.
    cased_non_ascii: bool,
    /// It is written with a trailing slash or ends in `**`: a path with a trailing slash is
    /// its own to servers that tell `/a/` from `/a` (Go, Flask), not only to those that do not.
    takes_trailing_slash: bool,
}

impl PathGlob {
    /// Compiles a glob. Errors are user-facing.
    pub fn new(glob: &str) -> Result<Self, String> {
        if !glob.starts_with('/') {
            return Err(format!("a path must start with /, got {glob:?}"));
        }
        if glob.contains(['?', '#']) {
            return Err(format!(
                "a path glob never contains ? or #: the query is not matched, got {glob:?}"
            ));
        }
        if glob.to_ascii_lowercase().contains("%2a") {
            return Err(format!(
                "a path glob cannot match a literal *: {glob:?} would be a wildcard once decoded"
            ));
        }
        // Spelled as the paths it is matched against: escapes decoded (`%20` is a space), and
        // what no request path keeps once normalised (a dot segment, `%2F`, `%25`, `;`) refused,
        // since a glob holding one could never match and its rule would never apply.
        let normalized = match path::normalize(glob, path::PathParameters::Refuse) {
            Ok((normalized, _)) => normalized,
            Err(problem) => {
                return Err(format!(
                    "a path glob must be spelled as a request path is once normalised, and {glob:?} cannot be: {} (docs/hostile-input.md, \"Paths\")",
                    problem.describe().trim_start_matches("the path ")
                ));
            }
        };
        let lower = normalized.to_ascii_lowercase();
        let in_case = match lower == normalized {
            true => None,
            false => Some(Box::new(Self::compile(glob, &normalized)?)),
        };
        // Escapes aside: normalisation writes the ones it keeps (`%3F`) in upper case.
        let mut letters = normalized.split('%');
        let first = letters.next().unwrap_or_default();
        let letters_in_case = first.bytes().any(|b| b.is_ascii_uppercase())
            || letters.any(|after| after.bytes().skip(2).any(|b| b.is_ascii_uppercase()));
        let cased_non_ascii = normalized
            .chars()
            .any(|c| !c.is_ascii() && (c.is_lowercase() || c.is_uppercase()));
        let takes_trailing_slash = normalized.ends_with('/') || normalized.ends_with("/**");
        Ok(Self {
            in_case,
            letters_in_case,
            cased_non_ascii,
            takes_trailing_slash,
            ..Self::compile(glob, &lower)?
        })
    }

    /// The glob `normalized` (shown as `glob`), compared in its case.
    fn compile(glob: &str, normalized: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        for s in normalized.split('/').filter(|s| !s.is_empty()) {
            segments.push(match s {
                "**" => Segment::Any,
                s if s.contains("**") => {
                    return Err(format!(
                        "** must be a whole segment (like /a/**/b), got {glob:?}"
                    ));
                }
                s if s.contains('*') => Segment::Wild(Wildcard::new(s)),
                s => Segment::Literal(s.to_owned()),
            });
        }
        let tail = segments
            .iter()
            .rposition(|s| matches!(s, Segment::Any))
            .map_or(0, |last_any| last_any + 1);
        Ok(Self {
            source: glob.to_owned(),
            segments,
            tail,
            in_case: None,
            letters_in_case: false,
            cased_non_ascii: false,
            takes_trailing_slash: false,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The glob spelled as a normalised request path is (escapes decoded), in its own case.
    pub fn spelled(&self) -> String {
        path::normalize(&self.source, path::PathParameters::Refuse)
            .map(|(spelled, _)| spelled.into_owned())
            .unwrap_or_default()
    }

    /// Whether the glob in lower case matches `normalized_path`, which the caller lowers.
    pub fn matches(&self, normalized_path: &str) -> bool {
        self.matches_counting(normalized_path).0
    }

    /// Whether the glob as written matches `normalized_path` as sent, letter case and all.
    pub fn matches_in_case(&self, normalized_path: &str) -> bool {
        self.in_case
            .as_deref()
            .unwrap_or(self)
            .matches(normalized_path)
    }

    /// Whether the glob matches a path with a trailing slash to servers that tell `/a/` from
    /// `/a`: it is written with one (`/a/`) or ends in `**`. [`Self::matches`] takes `/a/` for
    /// `/a` as well, as servers that do not tell them apart (ASP.NET Core) do.
    pub fn takes_trailing_slash(&self) -> bool {
        self.takes_trailing_slash
    }

    /// Whether the glob has a letter outside ASCII with another case (`é`): rules compare paths
    /// in ASCII lower case, so it cannot be matched the way servers that ignore case match it.
    pub fn has_cased_non_ascii(&self) -> bool {
        self.cased_non_ascii
    }

    /// Whether the glob has upper-case letters (so the two readings differ even on a path
    /// without any).
    pub fn has_upper_case(&self) -> bool {
        self.letters_in_case
    }

    /// Whether the path matches, and how many segment comparisons that took (for the bound the
    /// fuzz target checks).
    pub(crate) fn matches_counting(&self, normalized_path: &str) -> (bool, usize) {
        let mut steps = 0;
        if self.tail == 0 {
            // No `**`: one pass, segment against segment.
            let matched = match_segments(&self.segments, segments(normalized_path), &mut steps);
            return (matched, steps);
        }
        // With `**`: the segments after the last one must be the path's last segments. Checking
        // them first, from the end, settles most paths at once (`/**/z` on a long path without
        // `z` at its end), and leaves a pattern that ends in `**` for the rest.
        let (head, tail) = self.segments.split_at(self.tail);
        let mut rest = normalized_path;
        for segment in tail.iter().rev() {
            steps += 1;
            let trimmed = rest.trim_end_matches('/');
            let (before, last) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
            if last.is_empty() || !segment.matches(last) {
                return (false, steps);
            }
            rest = before;
        }
        // The segments walked in place (no list per request and rule).
        let matched = match_segments(head, segments(rest), &mut steps);
        (matched, steps)
    }

    /// The literal segments every matching path starts with (the rule index files the glob
    /// under them): the glob's segments up to its first `*` or `**`.
    pub(crate) fn literal_prefix(&self) -> Vec<&str> {
        self.segments
            .iter()
            .map_while(|segment| match segment {
                Segment::Literal(literal) => Some(literal.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The segments of the glob, for building the same pattern as a regex.
    pub(crate) fn segments(&self) -> impl Iterator<Item = GlobSegment<'_>> {
        self.segments.iter().map(|segment| match segment {
            Segment::Literal(lit) => GlobSegment::Literal(lit),
            Segment::Wild(w) => GlobSegment::Wild(&w.parts),
            Segment::Any => GlobSegment::Any,
        })
    }
}

/// One segment of a [`PathGlob`], as [`PathGlob::segments`] shows it.
pub(crate) enum GlobSegment<'a> {
    Literal(&'a str),
    /// The literal runs between `*`s.
    Wild(&'a [String]),
    Any,
}

/// Whether the path segments in `path` match `pattern`, in at most (segments × pattern length)
/// segment comparisons whatever the pattern: the classic wildcard match, with `**` as the star.
///
/// A `**` first matches no segment; on a later mismatch the most recent `**` takes one more
/// segment and matching resumes after it. Earlier `**`s never need to be revisited: whatever
/// they would take, the most recent one can take instead. A recursive search that tries every
/// split of every `**` is exponential in their number (`/**/a/**/a/**/z` against `/a/a/…/a`),
/// and rules are matched before a token is asked for.
fn match_segments<'a>(
    pattern: &[Segment],
    mut path: impl Iterator<Item = &'a str> + Clone,
    steps: &mut usize,
) -> bool {
    let mut at = 0;
    // After the most recent `**`: the pattern index to resume at and the path it resumes on.
    let mut resume = None;
    loop {
        let mut ahead = path.clone();
        let Some(segment) = ahead.next() else {
            // The path is used up: what is left of the pattern must match nothing.
            return pattern[at..].iter().all(|s| matches!(s, Segment::Any));
        };
        *steps += 1;
        match pattern.get(at) {
            // Nothing but `**` left: it takes the rest of the path, whatever that is.
            Some(Segment::Any) if pattern[at..].iter().all(|s| matches!(s, Segment::Any)) => {
                return true;
            }
            Some(Segment::Any) => {
                at += 1;
                resume = Some((at, path.clone()));
                continue;
            }
            Some(one) if one.matches(segment) => {
                at += 1;
                path = ahead;
                continue;
            }
            _ => {}
        }
        let Some((after_any, from)) = &mut resume else {
            return false;
        };
        // The `**` takes one more segment.
        from.next();
        at = *after_any;
        path = from.clone();
    }
}

/// The non-empty segments of a path, in order.
fn segments(path: &str) -> impl Iterator<Item = &str> + Clone {
    path.split('/').filter(|s| !s.is_empty())
}

impl Segment {
    /// Whether this one-segment pattern matches `segment` (never called on `**`).
    fn matches(&self, segment: &str) -> bool {
        match self {
            Segment::Literal(lit) => lit == segment,
            Segment::Wild(w) => w.matches(segment),
            Segment::Any => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matches_runs() {
        let w = Wildcard::new("payments.*");
        assert!(w.matches("payments.wire_transfer"));
        assert!(w.matches("payments."));
        assert!(!w.matches("payment.x"));
        assert!(Wildcard::new("*.example.com").matches("api.example.com"));
        assert!(!Wildcard::new("*.example.com").matches("example.com"));
        assert!(Wildcard::new("a*b*c").matches("aXXbYYc"));
        assert!(!Wildcard::new("a*b*c").matches("aXXcYYb"));
        assert!(Wildcard::new("*").matches(""));
        assert!(!Wildcard::new("ab*ba").matches("aba"));
    }

    #[test]
    fn path_globs_match_segments() {
        let admin = PathGlob::new("/admin/**").unwrap();
        assert!(admin.matches("/admin"));
        assert!(admin.matches("/admin/users/42"));
        assert!(!admin.matches("/administrator"));
        let all = PathGlob::new("/**").unwrap();
        assert!(all.matches("/"));
        assert!(all.matches("/x/y"));
        let one = PathGlob::new("/payments/*/approve").unwrap();
        assert!(one.matches("/payments/42/approve"));
        assert!(!one.matches("/payments/approve"));
        assert!(!one.matches("/payments/4/2/approve"));
        let mid = PathGlob::new("/a/**/z").unwrap();
        assert!(mid.matches("/a/z") && mid.matches("/a/b/c/z") && !mid.matches("/a/b"));
        let exact = PathGlob::new("/payments/wire").unwrap();
        assert!(exact.matches("/payments/wire") && exact.matches("/payments/wire/"));
        assert!(!exact.matches("/payments/wire/x"));
        assert!(PathGlob::new("/v1/*.json").unwrap().matches("/v1/a.json"));
        let upper = PathGlob::new("/Admin/**").unwrap();
        assert!(upper.matches("/admin/x"), "patterns are lowered too");
        assert_eq!(upper.as_str(), "/Admin/**");
        assert!(Wildcard::ignoring_case("pkg.Svc").matches("pkg.svc"));
        assert_eq!(Wildcard::ignoring_case("pkg.Svc").as_str(), "pkg.Svc");
    }

    #[test]
    fn many_double_stars_match_in_polynomial_time() {
        // Exponential for a search that tries every split: 1500 segments, three `**`.
        let glob = PathGlob::new("/**/a/**/a/**/z").unwrap();
        let path = "/a".repeat(1500);
        assert!(!glob.matches(&path));
        assert!(glob.matches(&format!("{path}/z")));
        let glob = PathGlob::new("/**/a*/**/*b/**").unwrap();
        assert!(glob.matches("/x/ay/y/xb"));
        assert!(!glob.matches("/x/ay/y/xc"));
        assert!(PathGlob::new("/**/**").unwrap().matches("/"));
        assert!(PathGlob::new("/a/**/**/b").unwrap().matches("/a/b"));
        assert!(!PathGlob::new("/a/**/b/**").unwrap().matches("/a/c"));
    }

    #[test]
    fn bad_globs_are_refused() {
        assert!(PathGlob::new("admin/**").is_err());
        assert!(PathGlob::new("/a**").is_err());
        assert!(PathGlob::new("/a?b=1").is_err());
        // No normalised request path holds these: the rule would never apply.
        for (glob, problem) in [
            ("/files/../admin/**", "contains a . or .. segment"),
            ("/files/./x", "contains a . or .. segment"),
            ("/files/%2e%2e/x", "contains a . or .. segment"),
            (
                "/files/%61",
                "contains a percent-encoded letter or digit, which upstreams read decoded or as \
                 sent",
            ),
            (
                "/files//x",
                "contains an empty segment (//), which upstreams merge or keep",
            ),
            (
                "/files/a%2Fb/**",
                "contains an encoded slash or a backslash",
            ),
            ("/files/a%25b", "contains an encoded percent sign"),
            ("/files;jsessionid=1/**", "contains path parameters (;)"),
            ("/files/%zz", "has invalid percent-encoding"),
        ] {
            let error = PathGlob::new(glob).unwrap_err();
            assert!(
                error.ends_with(&format!(
                    "cannot be: {problem} (docs/hostile-input.md, \"Paths\")"
                )),
                "{glob}: {error}"
            );
        }
    }

    /// A glob is spelled as the paths it meets: a request's escapes are decoded before matching,
    /// so the glob's are too.
    #[test]
    fn a_glob_with_escapes_matches_the_paths_it_spells() {
        let glob = PathGlob::new("/files/annual%20reports/**").unwrap();
        for target in [
            "/files/annual%20reports/q4.pdf",
            "/files/annual reports/q4.pdf",
        ] {
            let (path, _) = path::normalize(target, path::PathParameters::Refuse).unwrap();
            assert!(glob.matches(&path.to_ascii_lowercase()), "{target}");
        }
        assert_eq!(
            glob.as_str(),
            "/files/annual%20reports/**",
            "shown as written"
        );
        let glob = PathGlob::new("/caf%C3%A9/**").unwrap();
        assert!(glob.matches("/café/users"));
        // The escapes normalisation keeps are written in upper case, in globs and paths alike:
        // no letters of the glob's own.
        let glob = PathGlob::new("/a%3fb/**").unwrap();
        assert!(!glob.has_upper_case());
        assert!(glob.matches_in_case("/a%3Fb/c"));
        assert!(PathGlob::new("/A%3fb").unwrap().has_upper_case());
        assert!(PathGlob::new("/a%3fB").unwrap().has_upper_case());
        // An encoded `*` would be a wildcard once decoded: refused.
        for glob in ["/files/%2A", "/files/%2a%2a"] {
            assert!(
                PathGlob::new(glob).unwrap_err().contains("literal *"),
                "{glob}"
            );
        }
    }
}
