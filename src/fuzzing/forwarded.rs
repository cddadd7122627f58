//! The hosts a `Forwarded` header names (`request::forwarded_hosts`), which the request's host is
//! held to: a header is let through only when every reading names the request's host, so when
//! stepgate's readings all name one host (or none), every host a reader of the header takes must
//! be that host (or none). Past `MAX_FORWARDED_HOSTS`, or with a host longer than
//! `MAX_FORWARDED_HOST_BYTES`, the header is refused whole. Five twins,
//! the readers upstreams route on:
//! - the pattern Spring's `ForwardedHeaderUtils` and Quarkus apply, `(?i:host)="?([^;,"]+)"?`
//!   (ASCII letters in either case), at every place it matches (they take the first element's or
//!   the first match: a subset);
//! - Rack before 3.1: the value split at `;`, then each part at `,`, and each pair matched whole
//!   by `\s*(by|for|host|proto)\s*=\s*"?([^"]+)"?\s*` in any case (Ruby folds case as Unicode
//!   does: `ſ` is an `s`), every value read only when every pair matches;
//! - Rack 3.2 (as shipped): split the same way, each pair split at `=`, stripped and joined again,
//!   then matched whole by `(by|for|host|proto)="?([^"]+)"?`;
//! - a parser in the manner Rack was developing: a name up to the next `=` (stripped,
//!   lower-cased), a quoted value to its closing quote with backslash escapes undone, an unquoted
//!   one up to `;` or `,`; any name but `by`, `for`, `host` or `proto` and nothing is read;
//! - Jetty's `ForwardedRequestCustomizer` over `QuotedCSVParser` (and @angular/ssr alike):
//!   quotes dropped wherever they stand, escapes undone, then each element's `host=`.
//!
//! Each twin's host is compared with its surrounding spaces left out (as the request's host is
//! compared), and an empty one names no host.
//!
//! Input: a header value.

use std::sync::OnceLock;

use regex::Regex;

use crate::request::{MAX_FORWARDED_HOST_BYTES, MAX_FORWARDED_HOSTS, forwarded_hosts};

/// Ruby's `String#strip` set.
fn space(c: char) -> bool {
    matches!(c, '\0' | '\t' | '\n' | '\x0b' | '\x0c' | '\r' | ' ')
}

pub fn check(bytes: &[u8]) {
    let Ok(value) = std::str::from_utf8(bytes) else {
        return;
    };
    let Some(found) = forwarded_hosts(value) else {
        // Refused whole: only past the bounds, on host parameters and on a host's length.
        let names = value
            .to_lowercase()
            .replace('ſ', "s")
            .matches("host")
            .count();
        assert!(
            names > MAX_FORWARDED_HOSTS || value.len() > MAX_FORWARDED_HOST_BYTES,
            "Forwarded {value:?}: refused whole with {names} host names"
        );
        return;
    };
    // The decision refuses the header unless every reading names the request's host: so when
    // stepgate's readings all name one host, every twin's must name it too, and when there are
    // none, no twin may read one.
    let one_host = found
        .iter()
        .all(|h| crate::request::same_host(h, &found[0]));
    for (twin, hosts) in [
        ("Spring", spring(value)),
        ("Rack 3.0", rack_split(value)),
        ("Rack 3.2", rack_split_stripped(value)),
        ("Rack's parser", rack_parser(value)),
        ("Jetty", unquoted(value)),
    ] {
        for host in hosts {
            let host = host.trim_matches(space);
            if host.is_empty() || (!found.is_empty() && !one_host) {
                continue;
            }
            assert!(
                found
                    .first()
                    .is_some_and(|f| crate::request::same_host(f, host)),
                "Forwarded {value:?}: {twin} reads the host {host:?}, which stepgate's readings \
                 {found:?} would let pass as another"
            );
        }
    }
    for host in &found {
        assert!(!host.is_empty(), "Forwarded {value:?}: an empty host");
    }
}

fn spring(value: &str) -> Vec<String> {
    static TWIN: OnceLock<Regex> = OnceLock::new();
    // `(?i:host)` in Java folds ASCII only.
    let twin =
        TWIN.get_or_init(|| Regex::new(r#"[hH][oO][sS][tT]="?([^;,"]+)"?"#).expect("a regex"));
    // Every start of a match, not only the leftmost non-overlapping ones.
    let mut hosts = Vec::new();
    for start in (0..value.len()).filter(|&i| value.is_char_boundary(i)) {
        let Some(captures) = twin.captures_at(value, start) else {
            break;
        };
        if captures.get(0).expect("the whole match").start() == start {
            hosts.push(captures[1].to_owned());
        }
    }
    hosts
}

fn rack_split(value: &str) -> Vec<String> {
    static PAIR: OnceLock<Regex> = OnceLock::new();
    // Ruby's `\s` is ASCII; its `/i` folds as Unicode does.
    let pair = PAIR.get_or_init(|| {
        Regex::new(r#"(?i)\A[ \t\r\n\x0b\x0c]*(by|for|host|proto)[ \t\r\n\x0b\x0c]*=[ \t\r\n\x0b\x0c]*"?([^"]+)"?[ \t\r\n\x0b\x0c]*\z"#)
            .expect("a regex")
    });
    let mut hosts = Vec::new();
    for field in value.replace('\n', ";").split(';') {
        for part in field.split(',') {
            let Some(captures) = pair.captures(part) else {
                return Vec::new();
            };
            if captures[1].to_lowercase().replace('ſ', "s") == "host" {
                hosts.push(captures[2].to_owned());
            }
        }
    }
    hosts
}

/// Rack 3.2.4's `Utils.forwarded_values`: split at `;` then `,`, each pair split at `=` (Ruby
/// drops the empty pieces at the end), stripped and joined again, then matched whole.
fn rack_split_stripped(value: &str) -> Vec<String> {
    static PAIR: OnceLock<Regex> = OnceLock::new();
    let pair = PAIR
        .get_or_init(|| Regex::new(r#"(?i)\A(by|for|host|proto)="?([^"]+)"?\z"#).expect("a regex"));
    let mut hosts = Vec::new();
    for field in value.replace('\n', ";").split(';') {
        for part in field.split(',') {
            let mut pieces: Vec<&str> = part.split('=').collect();
            while pieces.last().is_some_and(|p| p.is_empty()) {
                pieces.pop();
            }
            let joined = pieces
                .iter()
                .map(|p| p.trim_matches(space))
                .collect::<Vec<_>>()
                .join("=");
            let Some(captures) = pair.captures(&joined) else {
                return Vec::new();
            };
            if captures[1].to_lowercase() == "host" {
                hosts.push(captures[2].to_owned());
            }
        }
    }
    hosts
}

/// Jetty's `QuotedCSVParser` (quotes dropped wherever they stand, escapes undone), then each
/// element's `host=` parameter, its name and value stripped.
fn unquoted(value: &str) -> Vec<String> {
    let mut text = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {}
            '\\' => text.extend(chars.next()),
            c => text.push(c),
        }
    }
    text.split(',')
        .flat_map(|element| element.split(';'))
        .filter_map(|param| {
            let (name, value) = param.split_once('=')?;
            name.trim_matches(space)
                .eq_ignore_ascii_case("host")
                .then(|| value.trim_matches(space).to_owned())
        })
        .collect()
}

/// A parser in the manner of Rack's own (3.1 development), kept as a third reading.
fn rack_parser(value: &str) -> Vec<String> {
    let skip = |s: &str| {
        s.trim_start_matches(|c| space(c) || c == ';' || c == ',')
            .to_owned()
    };
    let mut header = skip(&value.replace('\n', ";"));
    let (mut params, mut escapes) = (0, 0);
    let mut hosts = Vec::new();
    while let Some(i) = header.find('=') {
        params += 1;
        if params > 1024 {
            return Vec::new();
        }
        let name = header[..i].trim_matches(space).to_lowercase();
        header.drain(..=i);
        if !["by", "for", "host", "proto"].contains(&name.as_str()) {
            return Vec::new();
        }
        let mut read = String::new();
        if let Some(quoted) = header.strip_prefix('"') {
            let mut rest = quoted.to_owned();
            while let Some(at) = rest.find(['"', '\\']) {
                let c = rest[at..].chars().next().expect("found");
                read.push_str(&rest[..at]);
                rest.drain(..at + 1);
                if c == '"' {
                    break;
                }
                escapes += 1;
                if escapes > 1024 {
                    return Vec::new();
                }
                if let Some(escaped) = rest.chars().next() {
                    read.push(escaped);
                    rest.drain(..escaped.len_utf8());
                }
            }
            header = rest;
        } else if let Some(at) = header.find([';', ',']) {
            read = header[..at]
                .trim_end_matches(|c| space(c) || c == ';' || c == ',')
                .to_owned();
            header.drain(..at);
        } else {
            read = header.trim_matches(space).to_owned();
            header.clear();
        }
        if name == "host" {
            hosts.push(read.trim_start_matches(space).to_owned());
        }
        header = skip(&header);
    }
    hosts
}

pub fn seeds() -> Vec<Vec<u8>> {
    [
        "host=api.example.com",
        "for=192.0.2.60;proto=http;by=203.0.113.43",
        "For=\"[2001:db8:cafe::17]:4711\";Host=\"admin.example.com\"",
        "host=a, host=b;proto=https",
        "host= spaced ;host=\"quoted\\\"escape\"",
        "for=1.2.3.4; host = admin.example.com",
        "host\t=admin.example.com",
        "host=\"api.example.com,admin.example.com\"",
        "hoſt=admin.example.com",
        "xhost=evil;host=host=a",
        "HOST=\"\";host=",
        "for=\"host=inside.quotes\"",
        "hostÅ=é;host=ü.example",
        "host=api\"x;proto=https",
        "for=192.0.2.1, \"host\"=admin.example.com",
        "ho\"st\"=admin.example.com",
        "host=\"\"admin.example.com",
        "host = \"a=b\" ",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
