//! The method-override check of a request's query (`HttpAttributes::override_problem`): a request
//! is refused for its query exactly when one of its `&`- or `;`-separated parameters is named
//! `_method` as PHP reads names; and the query-token check (`has_query_token`) finds exactly the
//! parameters named `access_token` that way. The check splits the query, skips names that cannot spell it and
//! renames by hand (its names are decoded with `form_urlencoded`); the twin reads each pair with
//! `form_urlencoded` (`%XX` escapes, `+` a space, a broken escape kept as written, bytes that are
//! not UTF-8 replaced), then renames as PHP does: leading spaces dropped, cut at a NUL, `.`, ` `
//! and `[` as `_`, in any case.
//!
//! Input: a query string (what follows the `?` of the request target).

use crate::request::{Headers, HttpAttributes};

pub fn check(bytes: &[u8]) {
    let Ok(query) = std::str::from_utf8(bytes) else {
        return;
    };
    let request = HttpAttributes::new(
        "POST",
        "api.example",
        format!("/orders?{query}"),
        Headers::default(),
    );
    let php = |name: &str| -> String {
        let name = name.trim_start_matches(' ');
        let name = name.split('\0').next().unwrap_or_default();
        name.chars()
            .map(|c| match c {
                '.' | ' ' | '[' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    };
    let expected = query.split(';').any(|chunk| {
        form_urlencoded::parse(chunk.as_bytes()).any(|(name, _)| php(&name) == "_method")
    });
    assert_eq!(
        request.override_problem().is_some(),
        expected,
        "query {query:?}: refused as an override unlike the URL standard's and PHP's reading"
    );
    // The second-credential check reads `access_token` the same way, and as an array's name
    // (`access_token[…]`: what comes before the first `[` when a `]` follows).
    let array = |name: &str| -> Option<String> {
        let name = name.trim_start_matches(' ');
        let name = name.split('\0').next().unwrap_or_default();
        let (base, rest) = name.split_once('[')?;
        rest.contains(']').then(|| php(base))
    };
    let token = query.split(';').any(|chunk| {
        form_urlencoded::parse(chunk.as_bytes()).any(|(name, _)| {
            php(&name) == "access_token" || array(&name).as_deref() == Some("access_token")
        })
    });
    assert_eq!(
        request.has_query_token(),
        token,
        "query {query:?}: an access_token parameter found unlike the URL standard's and PHP's reading"
    );
}

pub fn seeds() -> Vec<Vec<u8>> {
    [
        "_method=GET",
        "a=1&_Method=GET;b",
        "%5Fmethod=GET",
        ".method=GET",
        "+_method=GET",
        "%20%20_method=GET",
        "[method=GET",
        "_method%00%zz=GET",
        "_meth%6Fd=GET",
        "_metho=GET&method=GET&x_method=GET",
        "_method%=GET&%C3%A9_method=GET",
        "=_method&_method",
        "access.token=x",
        "a=1;Access+Token=x",
        "access%5Btoken=x&access_tokens=y",
        "access_token[]=x&access_token%5B0%5D=y",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}
