//! The JWS header and payload reader (`identity::segments`) against serde_json on the same bytes:
//! the same accept or reject, where stepgate also refuses what serde_json would silently merge
//! (a member name twice at any depth), and when both accept, the same claims.

use std::fmt;

use serde::{
    Deserialize, Deserializer,
    de::{MapAccess, SeqAccess, Visitor},
};
use serde_json::{Map, Value};

use crate::identity::{
    KeepClaims,
    segments::{self, Raw},
};

/// The claims stepgate reads into slots of their own.
const SLOTS: [&str; 24] = [
    "iss",
    "sub",
    "aud",
    "exp",
    "nbf",
    "iat",
    "jti",
    "uti",
    "tid",
    "oid",
    "azp",
    "appid",
    "client_id",
    "cid",
    "scp",
    "scope",
    "idtyp",
    "typ",
    "acrs",
    "acr",
    "amr",
    "auth_time",
    "roles",
    "xms_cc",
];

/// `bytes` as a decoded header and as a decoded payload (every claim kept, and none kept).
pub fn check(bytes: &[u8]) {
    let expected = reference(bytes);
    assert_eq!(
        segments::header(bytes).is_some(),
        expected.is_some(),
        "header reader disagrees: {:?}",
        String::from_utf8_lossy(bytes)
    );
    let all = segments::claims(bytes, &KeepClaims::All);
    assert_eq!(
        all.as_ref().map(|c| &c.kept),
        expected.as_ref(),
        "claims reader disagrees: {:?}",
        String::from_utf8_lossy(bytes)
    );
    let Some(expected) = expected else {
        assert!(segments::claims(bytes, &KeepClaims::Named(Box::new([]))).is_none());
        return;
    };
    let mut none = segments::claims(bytes, &KeepClaims::Named(Box::new([])))
        .expect("keeping fewer claims accepts the same bytes");
    assert!(none.kept.is_empty());
    for name in SLOTS {
        let read = none.slot(name).expect("a slot").clone();
        let wanted = expected.get(name).map(Raw::from_value);
        assert_eq!(
            read,
            wanted,
            "claim {name}: {:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    let id_token = ["nonce", "at_hash", "c_hash"]
        .iter()
        .any(|m| expected.contains_key(*m));
    assert_eq!(none.id_token_members, id_token);
    assert_eq!(
        none.confirmation,
        expected.get("cnf").map(segments::Confirmation::of)
    );
}

/// What serde_json makes of the same bytes, when they are one valid JSON object whose member
/// names are distinct at every depth: `Value` keeps the last of a repeated name, so the
/// members are counted in a second pass of serde_json's own and compared with what it kept.
pub fn reference(bytes: &[u8]) -> Option<Map<String, Value>> {
    /// Members at every depth, as serde_json reads them (repeats included).
    struct Members(usize);
    impl<'de> Deserialize<'de> for Members {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Count;
            impl<'de> Visitor<'de> for Count {
                type Value = Members;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Members, A::Error> {
                    let mut n = 0;
                    while let Some((_, Members(inner))) = m.next_entry::<String, Members>()? {
                        n += 1 + inner;
                    }
                    Ok(Members(n))
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Members, A::Error> {
                    let mut n = 0;
                    while let Some(Members(inner)) = s.next_element()? {
                        n += inner;
                    }
                    Ok(Members(n))
                }
                fn visit_bool<E>(self, _: bool) -> Result<Members, E> {
                    Ok(Members(0))
                }
                fn visit_i64<E>(self, _: i64) -> Result<Members, E> {
                    Ok(Members(0))
                }
                fn visit_u64<E>(self, _: u64) -> Result<Members, E> {
                    Ok(Members(0))
                }
                fn visit_f64<E>(self, _: f64) -> Result<Members, E> {
                    Ok(Members(0))
                }
                fn visit_str<E>(self, _: &str) -> Result<Members, E> {
                    Ok(Members(0))
                }
                fn visit_unit<E>(self) -> Result<Members, E> {
                    Ok(Members(0))
                }
            }
            d.deserialize_any(Count)
        }
    }
    fn kept(value: &Value) -> usize {
        match value {
            Value::Object(map) => map.len() + map.values().map(kept).sum::<usize>(),
            Value::Array(items) => items.iter().map(kept).sum(),
            _ => 0,
        }
    }
    let value: Value = serde_json::from_slice(bytes).ok()?;
    let Members(read) = serde_json::from_slice(bytes).ok()?;
    match value {
        Value::Object(map) if read == kept(&Value::Object(map.clone())) => Some(map),
        _ => None,
    }
}

/// Starting points for the fuzzer: the header and payloads of real-looking tokens, and the
/// spellings that must be refused (a repeated name, an escaped one, a lone surrogate).
pub fn seeds() -> Vec<Vec<u8>> {
    let entra = crate::demo::TokenSpec {
        acrs: vec!["c1".into()],
        xms_cc: vec!["cp1".into()],
        auth_age: Some(60),
        ..crate::demo::TokenSpec::default()
    };
    let oidc = crate::demo::TokenSpec {
        issuer: crate::demo::DEMO_OIDC_ISSUER.to_owned(),
        acr: Some("urn:okta:loa:2fa:any".into()),
        amr: vec!["pwd".into(), "mfa".into()],
        roles: vec!["Admin".into()],
        ..crate::demo::TokenSpec::default()
    };
    let mut seeds: Vec<Vec<u8>> = [entra, oidc]
        .iter()
        .map(|spec| spec.claims(1_800_000_000).to_string().into_bytes())
        .collect();
    seeds.extend(
        [
            r#"{"alg":"RS256","kid":"stepgate-demo-rsa-1","typ":"at+jwt"}"#,
            r#"{"alg":"ES256","kid":"k","crit":["exp"],"jku":"https://x"}"#,
            r#"{"sub":"a","sub":"b"}"#,
            r#"{"s\u0075b":"a","sub":"b"}"#,
            r#"{"ext":{"roles":["a",{"x":[1,2.5e3,-0,null,true]}],"nested":{"k":"\ud83d\ude00"}}}"#,
            r#"{"x":"\ud800"}"#,
            r#"{"nonce":"n","at_hash":"h","exp":1.5e9,"nbf":-1,"aud":["a","b"]}"#,
            "{} ",
            "[]",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );
    seeds.push(b"{\"x\":\"\xc0\xaf\"}".to_vec());
    seeds
}
