//! The query rewriting of decision records (`telemetry::records::without_query_tokens`,
//! hand-written): the target comes back as it was, pair for pair and separator for separator
//! (`&` or `;`), but for the value of each pair whose name is `access_token` (plainly or
//! percent-encoded, as `request::is_access_token_name` reads it) or another credential's
//! (`request::is_credential_name`), which becomes `REDACTED`. A target with no such pair is
//! returned untouched.
//!
//! Input: a request target (`/path?query`).

use crate::{request::is_credential_name, telemetry::records::without_query_tokens};

pub fn check(bytes: &[u8]) {
    let Ok(target) = std::str::from_utf8(bytes) else {
        return;
    };
    let rewritten = without_query_tokens(target);
    let Some((path, query)) = target.split_once('?') else {
        assert_eq!(rewritten, target, "no query, nothing to redact");
        return;
    };
    // The model: every pair, in order, with the separator that ended it.
    let mut expected = format!("{path}?");
    let mut any_token = false;
    let mut pair = String::new();
    let flush = |pair: &mut String, out: &mut String, any_token: &mut bool| {
        match pair.split_once('=') {
            Some((name, _)) if is_credential_name(name) => {
                *any_token = true;
                out.push_str(name);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
        pair.clear();
    };
    for c in query.chars() {
        if c == '&' || c == ';' {
            flush(&mut pair, &mut expected, &mut any_token);
            expected.push(c);
        } else {
            pair.push(c);
        }
    }
    flush(&mut pair, &mut expected, &mut any_token);
    if any_token {
        assert_eq!(rewritten, expected, "{target:?}");
    } else {
        assert_eq!(rewritten, target, "no token in {target:?}");
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    [
        "/a?access_token=eyJ.x.y",
        "/a?x=1&access_token=eyJ.x.y&y=2",
        "/a?x=1;access_token=eyJ;y=2&z",
        "/a?%61ccess_token=eyJ",
        "/a?access%5ftoken=eyJ&access_token",
        "/a?access_token=1=2&&;",
        "/a?my_access_token=keep",
        "/cb?code=x&state=y&client%5Fsecret=z",
        "/cb?client.secret=x&refresh_token[]=y&+code=z&api_key%5B0%5D=k",
        "/a?access_token[]=eyJ&access_token%5B0%5D=eyJ",
        "/access_token=x",
        "/a?x=%zz&access_token=é",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
