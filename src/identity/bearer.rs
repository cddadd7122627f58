//! Finding the bearer token in a request (RFC 6750 §2.1).
//!
//! Envoy joins repeated headers with commas, so two `Authorization` headers arrive as one value
//! `Bearer a,Bearer b`; a token itself never contains a comma or a space, which makes both shapes of
//! "more than one credential" detectable from the value alone.

/// What the request carries in place of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential<'a> {
    /// No `Authorization` header (or an empty one) and no token.
    Missing,
    /// Exactly one bearer token.
    Bearer(&'a str),
    /// Something unusable: more than one credential, another scheme, an empty token, bad bytes.
    Malformed(CredentialProblem),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialProblem {
    /// Two tokens (two headers, or a header plus a token field).
    MultipleCredentials,
    /// Not the `Bearer` scheme (e.g. `Basic`), or no scheme at all.
    UnsupportedScheme,
    /// `Bearer` with nothing, or with more than one word, after it.
    MalformedBearer,
    /// The header value is not valid UTF-8 / contains control characters.
    InvalidBytes,
    /// A token in the query string (`access_token`) without one in the header: stepgate does not
    /// read tokens from the query, and the upstream must not take one it did not verify.
    QueryToken,
}

impl CredentialProblem {
    pub fn describe(self) -> &'static str {
        match self {
            Self::MultipleCredentials => "more than one credential was presented",
            Self::UnsupportedScheme => "the Authorization header does not use the Bearer scheme",
            Self::MalformedBearer => {
                "the Authorization header does not hold exactly one bearer token"
            }
            Self::InvalidBytes => "the Authorization header contains invalid bytes",
            Self::QueryToken => {
                "an access_token in the query string is not accepted: send the token in the \
                 Authorization header"
            }
        }
    }
}

/// Reads the credential from an `Authorization` header value.
pub fn from_authorization(value: &str) -> Credential<'_> {
    let value = value.trim_matches([' ', '\t']);
    if value.is_empty() {
        return Credential::Missing;
    }
    // One pass over the bytes (a token is ~1 KiB and this runs on every request).
    match scan(value) {
        Scan::Control => return Credential::Malformed(CredentialProblem::InvalidBytes),
        Scan::Comma => return Credential::Malformed(CredentialProblem::MultipleCredentials),
        Scan::Clean => {}
    }
    let Some((scheme, rest)) = value.split_once([' ', '\t']) else {
        return Credential::Malformed(if value.eq_ignore_ascii_case("bearer") {
            CredentialProblem::MalformedBearer
        } else {
            CredentialProblem::UnsupportedScheme
        });
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Credential::Malformed(CredentialProblem::UnsupportedScheme);
    }
    // The scan refused every control character, tabs included: a space is the only blank left,
    // found by a fold the compiler vectorises (memchr's word-at-a-time loop took longer).
    let token = rest.trim_start_matches(' ');
    let spaced = token.bytes().fold(false, |spaced, b| spaced | (b == b' '));
    if token.is_empty() || spaced {
        return Credential::Malformed(CredentialProblem::MalformedBearer);
    }
    Credential::Bearer(token)
}

/// Reads the credential from a bare token field (the `Decide` RPC's `token`).
enum Scan {
    Clean,
    /// A control character (`char::is_control`: C0, DEL or C1), which wins over a comma.
    Control,
    Comma,
}

fn scan(value: &str) -> Scan {
    let bytes = value.as_bytes();
    // A branch-free pass the compiler vectorises; nearly every header has nothing to report.
    let suspect = bytes.iter().fold(false, |seen, &b| {
        seen | (b < 0x20) | (b == 0x7f) | (b == 0xc2) | (b == b',')
    });
    if !suspect {
        return Scan::Clean;
    }
    let mut comma = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            0x00..=0x1f | 0x7f => return Scan::Control,
            // U+0080..U+009F are encoded as C2 80..C2 9F.
            0xc2 if matches!(bytes.get(i + 1), Some(0x80..=0x9f)) => return Scan::Control,
            b',' => comma = true,
            _ => {}
        }
    }
    if comma { Scan::Comma } else { Scan::Clean }
}

pub fn from_token(token: &str) -> Credential<'_> {
    let token = token.trim_matches([' ', '\t']);
    if token.is_empty() {
        Credential::Missing
    } else if token
        .chars()
        .any(|c| c.is_control() || c == ' ' || c == ',')
    {
        Credential::Malformed(CredentialProblem::MalformedBearer)
    } else {
        Credential::Bearer(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Credential::*;
    use CredentialProblem::*;

    #[test]
    fn reads_one_bearer_token_case_insensitively() {
        assert_eq!(
            from_authorization("Bearer abc.def.ghi"),
            Bearer("abc.def.ghi")
        );
        assert_eq!(from_authorization("bearer   abc"), Bearer("abc"));
        assert_eq!(from_authorization("BEARER abc "), Bearer("abc"));
    }

    #[test]
    fn the_byte_scan_agrees_with_char_is_control() {
        for c in ('\0'..='\u{3000}').chain(['\u{fffd}', '\u{10ffff}']) {
            let value = format!("Bearer a{c}b");
            let expected = if c.is_control() {
                Malformed(InvalidBytes)
            } else if c == ',' {
                Malformed(MultipleCredentials)
            } else if c == ' ' || c == '\t' {
                Malformed(MalformedBearer)
            } else {
                Bearer(&value[7..])
            };
            assert_eq!(from_authorization(&value), expected, "{:?}", c);
        }
        assert_eq!(
            from_authorization("Bearer a,\u{85}"),
            Malformed(InvalidBytes)
        );
    }

    #[test]
    fn empty_header_is_missing() {
        assert_eq!(from_authorization(""), Missing);
        assert_eq!(from_authorization("   "), Missing);
        assert_eq!(from_token(""), Missing);
    }

    #[test]
    fn two_headers_joined_by_envoy_are_refused() {
        assert_eq!(
            from_authorization("Bearer a,Bearer b"),
            Malformed(MultipleCredentials)
        );
        assert_eq!(
            from_authorization("Bearer a, Basic b"),
            Malformed(MultipleCredentials)
        );
    }

    #[test]
    fn other_schemes_and_shapes_are_refused() {
        assert_eq!(
            from_authorization("Basic dXNlcjpwYXNz"),
            Malformed(UnsupportedScheme)
        );
        assert_eq!(
            from_authorization("abc.def.ghi"),
            Malformed(UnsupportedScheme)
        );
        assert_eq!(from_authorization("Bearer"), Malformed(MalformedBearer));
        assert_eq!(from_authorization("Bearer a b"), Malformed(MalformedBearer));
        assert_eq!(
            from_authorization("Bearer a\u{0}b"),
            Malformed(InvalidBytes)
        );
        assert_eq!(from_token("a b"), Malformed(MalformedBearer));
    }

    /// The one-pass reading against the rules written out plainly, one search each, on values
    /// made of the characters that matter (blanks, commas, controls, C1 in UTF-8, the scheme).
    mod against_the_rules {
        use proptest::prelude::*;

        use super::*;

        fn by_the_rules(value: &str) -> Credential<'_> {
            let value = value.trim_matches([' ', '\t']);
            if value.is_empty() {
                return Missing;
            }
            if value.chars().any(char::is_control) {
                return Malformed(InvalidBytes);
            }
            if value.contains(',') {
                return Malformed(MultipleCredentials);
            }
            let Some((scheme, rest)) = value.split_once([' ', '\t']) else {
                return Malformed(if value.eq_ignore_ascii_case("bearer") {
                    MalformedBearer
                } else {
                    UnsupportedScheme
                });
            };
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Malformed(UnsupportedScheme);
            }
            let token = rest.trim_start_matches(' ');
            if token.is_empty() || token.contains(' ') {
                return Malformed(MalformedBearer);
            }
            Bearer(token)
        }

        fn value() -> impl Strategy<Value = String> {
            let piece = prop::sample::select(vec![
                " ", "  ", "\t", ",", "a", "Z", ".", "-", "\u{0}", "\u{7f}", "\u{85}", "\u{a0}",
                "é", "Bearer", "bearer", "Basic",
            ]);
            prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]
            #[test]
            fn the_one_pass_reads_as_the_rules_say(value in value()) {
                prop_assert_eq!(from_authorization(&value), by_the_rules(&value));
                let bearer = format!("Bearer {value}");
                prop_assert_eq!(from_authorization(&bearer), by_the_rules(&bearer));
            }
        }
    }
}
