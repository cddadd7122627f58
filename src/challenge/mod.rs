//! `WWW-Authenticate` values: RFC 6750 (no token, invalid request/token, insufficient scope),
//! RFC 9470 (`insufficient_user_authentication`) and the Entra ID claims challenge.
//!
//! One challenge per response, every parameter quoted (except RFC 9470's integer `max_age`), each
//! parameter at most once, in a fixed order so that golden tests and clients see stable bytes.
//! Values that come from a token never reach this module; those from the policy were checked at
//! load to contain no quotes or backslashes, and descriptions are scrubbed here.

use base64::{Engine, engine::general_purpose::STANDARD};

use crate::identity::EntraChallenge;

/// `Bearer realm="…"`: no credential was presented (RFC 6750 §3: no error code).
pub fn no_token(realm: &str) -> String {
    format!("Bearer realm=\"{realm}\"")
}

/// 400: the request is malformed (two credentials, a non-Bearer scheme, a bad path).
pub fn invalid_request(realm: &str, description: &str) -> String {
    with_error(realm, "invalid_request", description)
}

/// 401: the token is expired, badly signed, for another audience, …
pub fn invalid_token(realm: &str, description: &str) -> String {
    with_error(realm, "invalid_token", description)
}

/// 403: the token lacks a scope, role or claim. `scopes` are the scopes the resource requires.
pub fn insufficient_scope(realm: &str, description: &str, scopes: &[String]) -> String {
    let mut value = with_error(realm, "insufficient_scope", description);
    if !scopes.is_empty() {
        value.push_str(&format!(", scope=\"{}\"", scopes.join(" ")));
    }
    value
}

/// 401, RFC 9470 §3: the authentication is too weak (`acr_values`, most preferred first) or too old
/// (`max_age`, seconds).
pub fn insufficient_user_authentication(
    realm: &str,
    description: &str,
    acr_values: &[String],
    max_age: Option<u64>,
) -> String {
    let mut value = with_error(realm, "insufficient_user_authentication", description);
    if !acr_values.is_empty() {
        value.push_str(&format!(", acr_values=\"{}\"", acr_values.join(" ")));
    }
    if let Some(max_age) = max_age {
        value.push_str(&format!(", max_age={max_age}"));
    }
    value
}

/// 401, Entra ID claims challenge, in the parameter order of Microsoft's documentation.
pub fn entra_claims(entra: &EntraChallenge, claims_base64: &str) -> String {
    let mut value = format!(
        "Bearer realm=\"{}\", authorization_uri=\"{}\"",
        entra.realm, entra.authorization_uri
    );
    if let Some(client_id) = &entra.client_id {
        value.push_str(&format!(", client_id=\"{client_id}\""));
    }
    value.push_str(&format!(
        ", error=\"insufficient_claims\", claims=\"{claims_base64}\""
    ));
    value
}

/// The minified claims request asking Entra for authentication context `context`.
pub fn entra_claims_request(context: &str) -> String {
    serde_json::json!({"access_token": {"acrs": {"essential": true, "value": context}}}).to_string()
}

/// Standard base64 with padding, as Microsoft's own APIs emit the `claims` parameter.
pub fn encode_claims(claims_json: &str) -> String {
    STANDARD.encode(claims_json)
}

fn with_error(realm: &str, error: &str, description: &str) -> String {
    format!(
        "Bearer realm=\"{realm}\", error=\"{error}\", error_description=\"{}\"",
        scrub(description)
    )
}

/// RFC 6750 §3: `error_description` is printable ASCII without `"` and `\`.
fn scrub(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if (' '..='~').contains(&c) => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common() -> EntraChallenge {
        EntraChallenge {
            authorization_uri: "https://login.microsoftonline.com/common/oauth2/authorize".into(),
            realm: String::new(),
            client_id: None,
        }
    }

    #[test]
    fn microsofts_own_claims_example_encodes_exactly() {
        let json = entra_claims_request("c1");
        assert_eq!(
            json,
            r#"{"access_token":{"acrs":{"essential":true,"value":"c1"}}}"#
        );
        assert_eq!(
            encode_claims(&json),
            "eyJhY2Nlc3NfdG9rZW4iOnsiYWNycyI6eyJlc3NlbnRpYWwiOnRydWUsInZhbHVlIjoiYzEifX19"
        );
    }

    #[test]
    fn entra_challenge_matches_the_documented_header() {
        let b64 = encode_claims(&entra_claims_request("c1"));
        assert_eq!(
            entra_claims(&common(), &b64),
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", \
             error=\"insufficient_claims\", claims=\"eyJhY2Nlc3NfdG9rZW4iOnsiYWNycyI6eyJlc3NlbnRpYWwiOnRydWUsInZhbHVlIjoiYzEifX19\""
        );
        let with_client = EntraChallenge {
            client_id: Some("api-app-id".into()),
            ..common()
        };
        assert!(entra_claims(&with_client, &b64).contains(", client_id=\"api-app-id\", error="));
    }

    #[test]
    fn padding_is_kept_for_contexts_that_need_it() {
        // c25's request is 58 bytes: standard base64 pads it.
        let b64 = encode_claims(&entra_claims_request("c25"));
        assert!(b64.ends_with('='), "{b64}");
        assert_eq!(
            STANDARD.decode(&b64).unwrap(),
            entra_claims_request("c25").as_bytes()
        );
    }

    #[test]
    fn rfc6750_golden_headers() {
        assert_eq!(no_token("example"), "Bearer realm=\"example\"");
        assert_eq!(
            invalid_token("example", "The access token expired"),
            "Bearer realm=\"example\", error=\"invalid_token\", error_description=\"The access token expired\""
        );
        assert_eq!(
            insufficient_scope(
                "api",
                "missing scope",
                &["payments.write".into(), "openid".into()]
            ),
            "Bearer realm=\"api\", error=\"insufficient_scope\", error_description=\"missing scope\", scope=\"payments.write openid\""
        );
    }

    #[test]
    fn rfc9470_golden_header() {
        assert_eq!(
            insufficient_user_authentication(
                "api",
                "A different authentication level is required",
                &["myACR".into(), "urn:okta:loa:2fa:any".into()],
                Some(300)
            ),
            "Bearer realm=\"api\", error=\"insufficient_user_authentication\", \
             error_description=\"A different authentication level is required\", \
             acr_values=\"myACR urn:okta:loa:2fa:any\", max_age=300"
        );
        assert_eq!(
            insufficient_user_authentication("api", "too old", &[], None),
            "Bearer realm=\"api\", error=\"insufficient_user_authentication\", error_description=\"too old\""
        );
    }

    #[test]
    fn descriptions_cannot_break_out_of_quotes() {
        let v = invalid_request("r", "bad \"quote\" \\ and\nnewline é");
        assert_eq!(
            v,
            "Bearer realm=\"r\", error=\"invalid_request\", error_description=\"bad 'quote' ' and?newline ?\""
        );
    }
}
