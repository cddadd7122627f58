//! The path rules match against: the request target without its query, percent-escapes decoded,
//! and nothing left that two servers could read differently.
//!
//! A path is decided once by stepgate and served once by the upstream, and the two must agree on
//! what it names. Servers disagree on a few spellings, and an authorizer that picks one reading
//! lets an attacker pick the other: Tomcat and Spring treat `/admin/..;/healthz` as `/healthz`,
//! while Go, Node and nginx see a segment `..;` under `/admin`. So what has no single meaning is
//! refused (`400 invalid_path`), much as Spring Security's `StrictHttpFirewall` and Envoy's
//! `path_with_escaped_slashes_action: REJECT_REQUEST` refuse it:
//! - dot segments (`.`, `..`) in any spelling: `%2e%2e`, `..;x`. Clients remove them before
//!   sending (RFC 3986 §5.2.4), so only a crafted request carries one, and upstreams differ on
//!   whether they resolve it (nginx, Go and Tomcat do; Node and Express route the raw path);
//! - encoded slashes and backslashes (`%2F`, `%5C`, `\`) and encoded percent signs (`%25`, which a
//!   server that decodes twice reads as an escape);
//! - control characters, raw or encoded, broken escapes, and bytes that are not UTF-8 once decoded;
//! - path parameters (`;…`): servlet containers cut them from a segment, other servers keep them as
//!   part of its name. With `upstream.path_parameters: strip` (an upstream that is a servlet
//!   container) they are cut, as that upstream does, and a segment that is nothing but parameters
//!   is still refused;
//! - escapes of letters and digits (`%61`): no client needs to encode them (RFC 3986 §2.3), and
//!   upstreams differ on whether they decode them before routing (Go, Spring and Envoy's
//!   `normalize_path` do; Express and Rails route the path as sent, so `/%64ocs/x` is not their
//!   `/docs/:page`). Under a policy whose path globs spell one of the other characters a path
//!   may hold as it is (`-._~!$&'()*+,=:@`, as in `/v1/*:search`), its escapes too ([`Spelled`]);
//! - empty segments (`//`, a trailing slash aside): nginx and Envoy's `merge_slashes` merge them,
//!   Express and Istio by default do not, so `//docs/x` is not Express's `/docs/:page` either.
//!
//! Every other escape is decoded (`%20` is a space, `%C3%A9` is `é`), except those of `?`, `#`
//! and `;`, which would change the path's structure; they stay escaped, in upper case.

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
    /// `%25`: a server that decodes twice reads what follows as another escape.
    EncodedPercent,
    /// A `.` or `..` segment, in any spelling.
    DotSegment,
    /// Path parameters (`;…`), which servers read differently.
    Parameters,
    /// Not origin-form (`/…`).
    NotAbsolute,
    /// An escape of a letter or digit, which no client needs to encode and upstreams decode or
    /// not.
    EncodedLetterOrDigit,
    /// An escape of a character the policy's path globs spell as it is ([`Spelled`]).
    EncodedSpelled,
    /// A `+` in a path, under a policy whose path globs spell a space, which some upstreams read
    /// a `+` in a path as (Sinatra).
    PlusForSpace,
    /// An empty segment (`//`) before the last, which upstreams merge or not.
    EmptySegment,
    /// A raw `#`: a fragment a client never sends, which proxies strip, refuse or pass on, and
    /// which some frameworks keep in the path (Go's `ParseRequestURI`).
    Fragment,
}

impl PathProblem {
    pub fn describe(self) -> &'static str {
        match self {
            Self::AmbiguousSeparator => "the path contains an encoded slash or a backslash",
            Self::ControlCharacter => "the path contains a control character",
            Self::BadEncoding => "the path has invalid percent-encoding",
            Self::EncodedPercent => "the path contains an encoded percent sign",
            Self::DotSegment => "the path contains a . or .. segment",
            Self::Parameters => "the path contains path parameters (;)",
            Self::NotAbsolute => "the path does not start with /",
            Self::EncodedLetterOrDigit => {
                "the path contains a percent-encoded letter or digit, which upstreams read decoded \
                 or as sent"
            }
            Self::EncodedSpelled => {
                "the path contains a percent-encoded character that the policy's path rules spell \
                 as it is, which upstreams read decoded or as sent; send it unencoded"
            }
            Self::PlusForSpace => {
                "the path contains a + and the policy's path rules spell a space, which some \
                 upstreams read a + in a path as"
            }
            Self::EmptySegment => {
                "the path contains an empty segment (//), which upstreams merge or keep"
            }
            Self::Fragment => "the request target contains a # (a fragment)",
        }
    }
}

/// What path parameters (`;…` in a segment) mean to the upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PathParameters {
    /// Refused: the upstream may read them either way.
    #[default]
    Refuse,
    /// Cut from each segment, as servlet containers (Tomcat, Jetty, Spring) do.
    Strip,
}

/// Splits a request target into its normalised path (for matching) and its raw query. A path
/// already in normal form (the usual case) is borrowed, not copied.
pub fn normalize(
    target: &str,
    parameters: PathParameters,
) -> Result<(Cow<'_, str>, &str), PathProblem> {
    // Byte searches: `str`'s searches for a `char` cost more to set up than these short texts
    // take to scan.
    if target.as_bytes().contains(&b'#') {
        return Err(PathProblem::Fragment);
    }
    let (path, query) = match target.bytes().position(|b| b == b'?') {
        Some(at) => (&target[..at], &target[at + 1..]),
        None => (target, ""),
    };
    if !path.starts_with('/') {
        return Err(PathProblem::NotAbsolute);
    }
    if is_normal(path) {
        return Ok((Cow::Borrowed(path), query));
    }
    if path.contains('\\') {
        return Err(PathProblem::AmbiguousSeparator);
    }
    if path.chars().any(char::is_control) {
        return Err(PathProblem::ControlCharacter);
    }
    Ok((Cow::Owned(resolve(path, parameters)?), query))
}

/// Decodes escapes, refuses what is ambiguous and cuts parameters (when stripping).
fn resolve(path: &str, parameters: PathParameters) -> Result<String, PathProblem> {
    let decoded = decode(path)?;
    let mut out = String::with_capacity(decoded.len());
    let mut segments = decoded.split('/').peekable();
    // The empty name before the leading `/`.
    segments.next();
    while let Some(segment) = segments.next() {
        let name = match segment.split_once(';') {
            None => segment,
            Some(_) if parameters == PathParameters::Refuse => {
                return Err(PathProblem::Parameters);
            }
            // Nothing but parameters: Tomcat drops the segment, other servers keep it.
            Some(("", _)) => return Err(PathProblem::Parameters),
            Some((name, _)) => name,
        };
        match name {
            // After a trailing slash.
            "" if segments.peek().is_none() => {}
            "" => return Err(PathProblem::EmptySegment),
            "." | ".." => return Err(PathProblem::DotSegment),
            name => {
                out.push('/');
                out.push_str(name);
            }
        }
    }
    if out.is_empty() || decoded.ends_with('/') {
        out.push('/');
    }
    Ok(out)
}

/// Whether `path` (absolute, without query) is already what [`normalize`] would make of it: only
/// visible ASCII without `%`, `;` or `\\`, and no empty (but a trailing), `.` or `..` segment.
/// Nearly every request's path is; this saves the decoding and re-assembly. Its cost is two
/// passes over the bytes (the first vectorised), whatever the number of segments: a long path
/// of short segments must not cost a search per segment.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    let odd = bytes.iter().fold(false, |odd, &b| {
        odd | !(0x21..=0x7e).contains(&b) | (b == b'%') | (b == b';') | (b == b'\\')
    });
    // After each `/`: not another (an empty segment), nor `.` or `..` and the end or a `/` (a dot
    // segment).
    !odd && bytes.iter().enumerate().all(|(at, &b)| {
        b != b'/'
            || !matches!(
                &bytes[at + 1..],
                [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
            )
    })
}

/// Decodes `%XX` escapes, except those of `?`, `#` and `;` (kept, upper-cased): they would change
/// the path's structure. Refuses escapes of separators, control characters, `%`, letters and
/// digits.
fn decode(path: &str) -> Result<Cow<'_, str>, PathProblem> {
    if !path.contains('%') {
        return Ok(Cow::Borrowed(path));
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
        let byte = match bytes.get(i + 1..i + 3) {
            Some(&[high, low]) => hex(high)
                .zip(hex(low))
                .map(|(h, l)| h << 4 | l)
                .ok_or(PathProblem::BadEncoding)?,
            _ => return Err(PathProblem::BadEncoding),
        };
        match byte {
            b'/' | b'\\' => return Err(PathProblem::AmbiguousSeparator),
            b'%' => return Err(PathProblem::EncodedPercent),
            b if b.is_ascii_control() => return Err(PathProblem::ControlCharacter),
            b if b.is_ascii_alphanumeric() => return Err(PathProblem::EncodedLetterOrDigit),
            b'?' | b'#' | b';' => out.extend_from_slice(&[
                b'%',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 15)],
            ]),
            b => out.push(b),
        }
        i += 3;
    }
    let text = String::from_utf8(out).map_err(|_| PathProblem::BadEncoding)?;
    // A decoded C1 control (U+0080..U+009F, `%C2%80`…) is as unwelcome as a raw one.
    if text.chars().any(char::is_control) {
        return Err(PathProblem::ControlCharacter);
    }
    Ok(Cow::Owned(text))
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The characters a policy's path globs spell as they are, among those a request path may hold
/// both as they are and encoded (RFC 3986's `pchar` but letters, digits, `%`, `;` and `*`): an
/// escape of one (`/v1/secret%3Asearch` against `/v1/*:search`) is the glob's character to an
/// upstream that decodes the path (Go, Spring) and not to one that routes it as sent (Express,
/// Rails, gRPC transcoders finding a `:verb`), and is refused. Escapes of the others are
/// decoded: they fall within a glob's wildcards, read the same either way. And whether they
/// spell a space: a `+` in a path is a space to some upstreams (Sinatra), and is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spelled {
    chars: Vec<u8>,
    space: bool,
}

impl Spelled {
    /// What `globs` (each spelled as a normalised path) spell.
    pub fn of<S: AsRef<str>>(globs: impl IntoIterator<Item = S>) -> Self {
        let mut spelled = Self::default();
        for glob in globs {
            for b in glob.as_ref().bytes() {
                if b"-._~!$&'()+,=:@".contains(&b) && !spelled.chars.contains(&b) {
                    spelled.chars.push(b);
                }
                spelled.space |= b == b' ';
            }
        }
        spelled
    }

    /// Whether the globs spell a space (a `+` in any path is then refused).
    pub fn spells_space(&self) -> bool {
        self.space
    }

    /// The characters spelled whose escapes are refused, in the order first spelled.
    pub fn chars(&self) -> &[u8] {
        &self.chars
    }

    /// Why `target`'s path spells one of these characters as upstreams read two ways, if it
    /// does. Its cost is nothing for a path without `%` (and `+`, under globs with a space).
    pub fn refuses(&self, target: &str) -> Option<PathProblem> {
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        if self.space && path.contains('+') {
            return Some(PathProblem::PlusForSpace);
        }
        if self.chars.is_empty() || !path.contains('%') {
            return None;
        }
        let bytes = path.as_bytes();
        bytes
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'%')
            .filter_map(|(at, _)| {
                let (high, low) = (hex(*bytes.get(at + 1)?)?, hex(*bytes.get(at + 2)?)?);
                Some(high << 4 | low)
            })
            .any(|b| self.chars.contains(&b))
            .then_some(PathProblem::EncodedSpelled)
    }
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// `path` without the extension of its last segment (the one before a trailing slash, which is
/// kept), as an upstream that serves `/a.json` from its `/a` route reads it: cut at the
/// segment's first dot (Spring MVC's `/a.*`, and Rails's `(.:format)` after a name without
/// dots) and, when that is another, at its last (Rails's after a name that may hold dots). A dot
/// leading the segment is part of its name (`.env` is a name, `.env.json` is `.env` with an
/// extension). None when the segment has no dot past its name's first character.
pub fn without_extension(path: &str) -> [Option<String>; 2] {
    // Searched as bytes (`/` and `.` are ASCII, so each found is a character boundary): a
    // `char` searched from the end is decoded character by character.
    let body = path.strip_suffix('/').unwrap_or(path);
    let start = body.bytes().rposition(|b| b == b'/').map_or(0, |at| at + 1);
    let segment = &body[start..];
    let leading = segment.bytes().take_while(|&b| b == b'.').count();
    let Some(first) = segment.bytes().skip(leading).position(|b| b == b'.') else {
        return [None, None];
    };
    let first = leading + first;
    let last = segment
        .bytes()
        .rposition(|b| b == b'.')
        .filter(|&at| at != first);
    let trailing = &path[body.len()..];
    let cut = |at: usize| Some(format!("{}{trailing}", &path[..start + at]));
    [cut(first), last.and_then(cut)]
}

#[cfg(test)]
mod tests {
    use super::*;

    use PathParameters::{Refuse, Strip};

    fn path(target: &str) -> String {
        normalize(target, Refuse).unwrap().0.into_owned()
    }

    fn problem(target: &str) -> PathProblem {
        normalize(target, Refuse).expect_err(target)
    }

    #[test]
    fn strips_the_query_and_keeps_it() {
        assert_eq!(
            normalize("/payments/wire?dry_run=1", Refuse),
            Ok((Cow::Borrowed("/payments/wire"), "dry_run=1"))
        );
        // A fragment is refused, wherever it is: `/healthz#/../admin` is `/healthz` to one
        // server and `/admin` to another.
        for target in ["/a#frag", "/healthz#/../admin/users", "/a?x=1#y", "/a%23b#"] {
            assert_eq!(
                normalize(target, Refuse),
                Err(PathProblem::Fragment),
                "{target}"
            );
        }
        // Only a path that needs rewriting is copied.
        assert!(matches!(normalize("/a%20b", Refuse).unwrap().0, Cow::Owned(p) if p == "/a b"));
        assert!(matches!(
            normalize("/a/b", Refuse).unwrap().0,
            Cow::Borrowed("/a/b")
        ));
    }

    /// `//docs/x` is `/docs/x` to nginx and to Envoy with `merge_slashes`, and a segment of its
    /// own to Express (and to Envoy without it, Istio's default): refused, as Spring's
    /// `StrictHttpFirewall` refuses it. A trailing slash is not an empty segment.
    #[test]
    fn refuses_empty_segments_and_keeps_a_trailing_slash() {
        for target in [
            "//admin/users",
            "/admin//users",
            "/a//",
            "//",
            "/a/%3F//b",
            "/a%20//b",
        ] {
            assert_eq!(problem(target), PathProblem::EmptySegment, "{target}");
        }
        assert_eq!(path("/"), "/");
        assert_eq!(path("/a/"), "/a/");
        assert_eq!(path("/a%20b/"), "/a b/");
        let strip = |t: &str| normalize(t, Strip).map(|(p, _)| p.into_owned());
        assert_eq!(strip("/a;x//b"), Err(PathProblem::EmptySegment));
        assert_eq!(strip("/a/b;x/").as_deref(), Ok("/a/b/"));
    }

    /// No client needs to encode a letter or a digit (RFC 3986 §2.3), and Express and Rails
    /// route `/%64ocs/x` as sent, not as their `/docs/:page`.
    #[test]
    fn refuses_escapes_of_letters_and_digits() {
        for target in [
            "/%61dmin",
            "/%41dmin",
            "/%64ocs/billing",
            "/a%30",
            "/caf%C3%A9/%61",
        ] {
            assert_eq!(
                problem(target),
                PathProblem::EncodedLetterOrDigit,
                "{target}"
            );
        }
        assert_eq!(path("/a%2D%5f%7e%2E"), "/a-_~.");
    }

    /// An escape of a character the policy's globs spell as it is picks their rule decoded and
    /// another as sent; the others fall within wildcards, read the same either way. A `+` is a
    /// space to Sinatra.
    #[test]
    fn escapes_of_what_the_globs_spell_are_refused() {
        let spelled = Spelled::of(["/v1/*:search", "/files/annual reports/**", "/~alice"]);
        for (target, expected) in [
            ("/v1/secret%3Asearch", Some(PathProblem::EncodedSpelled)),
            (
                "/v1/secret%3asearch?q=%3A",
                Some(PathProblem::EncodedSpelled),
            ),
            ("/%7Ealice", Some(PathProblem::EncodedSpelled)),
            ("/files/annual+reports/x", Some(PathProblem::PlusForSpace)),
            ("/files/annual%20reports/x", None),
            ("/v1/a%24b", None),
            ("/v1/secret:search", None),
            ("/a?b+c", None),
            ("/a%2", None),
        ] {
            assert_eq!(spelled.refuses(target), expected, "{target}");
        }
        let none = Spelled::of(["/docs/**", "/v1/*"]);
        assert_eq!(none.refuses("/v1/a%3Ab+c"), None);
        assert_eq!(
            Spelled::of(["/odata/$metadata"]).refuses("/odata/%24metadata"),
            Some(PathProblem::EncodedSpelled)
        );
    }

    #[test]
    fn decodes_every_other_escape_but_those_that_change_the_structure() {
        assert_eq!(path("/caf%C3%A9"), "/café");
        assert_eq!(path("/caf%c3%a9"), path("/café"));
        assert_eq!(path("/a%2ab%40c%20d"), "/a*b@c d");
        assert_eq!(path("/a%3fb%23c%3bd"), "/a%3Fb%23c%3Bd");
    }

    #[test]
    fn ordinary_names_with_dots_are_not_dot_segments() {
        for ok in ["/.well-known/jwks", "/a..b", "/...", "/a/.b/c.", "/v1.2/x"] {
            assert_eq!(path(ok), ok, "{ok}");
        }
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for target in ["/public/../admin", "/a/./b", "/..", "/.", "/a/.."] {
            assert_eq!(problem(target), PathProblem::DotSegment, "{target}");
        }
        // And spelled with escapes.
        for target in [
            "/%2e%2e/admin",
            "/%2E./admin",
            "/.%2e/admin",
            "/admin/%2e/x",
        ] {
            assert_eq!(problem(target), PathProblem::DotSegment, "{target}");
        }
    }

    #[test]
    fn path_parameters_are_refused_unless_the_upstream_strips_them() {
        for target in [
            "/admin/..;/healthz",
            "/admin/.;/x",
            "/x/;/..",
            "/payments/wire;x=1",
            "/a;jsessionid=1/",
        ] {
            assert_eq!(problem(target), PathProblem::Parameters, "{target}");
        }
        let strip = |t: &str| normalize(t, Strip).map(|(p, _)| p.into_owned());
        assert_eq!(strip("/payments/wire;x=1").as_deref(), Ok("/payments/wire"));
        assert_eq!(strip("/payments;x=1/wire").as_deref(), Ok("/payments/wire"));
        assert_eq!(strip("/a;jsessionid=1/").as_deref(), Ok("/a/"));
        // What Tomcat reads as `..` (or as nothing) is refused all the same.
        assert_eq!(strip("/admin/..;/healthz"), Err(PathProblem::DotSegment));
        assert_eq!(strip("/admin/%2e%2e;/x"), Err(PathProblem::DotSegment));
        assert_eq!(strip("/admin/.;x/y"), Err(PathProblem::DotSegment));
        assert_eq!(strip("/x/;/.."), Err(PathProblem::Parameters));
        assert_eq!(strip("/;x/admin"), Err(PathProblem::Parameters));
        // An escaped semicolon is part of the name for every server.
        assert_eq!(path("/a%3Bb"), "/a%3Bb");
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
        // What is normal, by searches for what is not.
        let by_searches = |path: &str| {
            !path
                .bytes()
                .any(|b| !(0x21..=0x7e).contains(&b) || b"%;\\".contains(&b))
                && !path.contains("//")
                && !path.match_indices("/.").any(|(at, _)| {
                    matches!(
                        &path.as_bytes()[at + 2..],
                        [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..]
                    )
                })
        };
        for p in &paths {
            assert_eq!(is_normal(p), by_searches(p), "{p:?}");
            if is_normal(p) {
                assert_eq!(resolve(p, Refuse).as_deref(), Ok(p.as_str()), "{p:?}");
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
        for (target, expected) in [
            ("/payments/wire%00", PathProblem::ControlCharacter),
            ("/a%0a", PathProblem::ControlCharacter),
            ("/a\u{7f}", PathProblem::ControlCharacter),
            ("/a%C2%85", PathProblem::ControlCharacter),
            ("/admin%2Fusers", PathProblem::AmbiguousSeparator),
            ("/admin%5cusers", PathProblem::AmbiguousSeparator),
            ("/admin\\users", PathProblem::AmbiguousSeparator),
            ("/a%252e%252e/x", PathProblem::EncodedPercent),
            ("/a%zz", PathProblem::BadEncoding),
            ("/a%", PathProblem::BadEncoding),
            ("/a%4", PathProblem::BadEncoding),
            ("/a%ff", PathProblem::BadEncoding),
            ("/a%C3", PathProblem::BadEncoding),
            ("/a%+1", PathProblem::BadEncoding),
            ("admin", PathProblem::NotAbsolute),
            ("", PathProblem::NotAbsolute),
        ] {
            assert_eq!(normalize(target, Refuse), Err(expected), "{target:?}");
        }
    }
}

#[cfg(test)]
mod extension_tests {
    use super::without_extension;

    /// Cut at the last segment's first dot and, when another, its last; the trailing slash
    /// kept; nothing for a segment without a dot past its name's first character (leading dots
    /// are part of the name).
    #[test]
    fn the_path_without_its_extension_is_read_as_rails_and_spring_read_it() {
        let cuts = |path: &str| without_extension(path).map(|c| c.unwrap_or_default());
        for (path, first, last) in [
            ("/payments/wire.json", "/payments/wire", ""),
            ("/payments/wire.json/", "/payments/wire/", ""),
            ("/files/a.b.json", "/files/a", "/files/a.b"),
            ("/v1.2/orders", "", ""),
            ("/orders/.env", "", ""),
            ("/orders/.env.json", "/orders/.env", ""),
            ("/.settings.json/", "/.settings/", ""),
            ("/a/.x.b.json", "/a/.x", "/a/.x.b"),
            ("/a/..json", "", ""),
            ("/a/..x.json", "/a/..x", ""),
            ("/orders/42", "", ""),
            ("/", "", ""),
            ("", "", ""),
            ("/a.", "/a", ""),
            ("/é.json", "/é", ""),
        ] {
            assert_eq!(cuts(path), [first.to_owned(), last.to_owned()], "{path}");
        }
    }
}
