//! The JWS header and payload, read in one pass into the fields stepgate decides on.
//!
//! Every uncached token is parsed, so the parse is on the hot path: a generic `serde_json` map
//! allocates every key and value of a 20-claim payload and hashes each key, which cost more than
//! the rest of the decision put together. Here each member is matched by name as it streams past:
//! a claim stepgate reads is kept as a [`Raw`] value borrowed from the decoded bytes, a claim the
//! policy keeps (see [`KeepClaims`]) is parsed into a `serde_json::Value`, and anything else is
//! walked without allocating.
//!
//! The reading is stricter than a map: what two JSON libraries would read differently is
//! refused (RFC 8725 §3.2, RFC 7515 §5.2, RFC 8259 §4 and §8.1). The segment must be exactly one
//! JSON object; a member name that repeats, at any depth, makes it invalid (one library keeps the
//! first value, another the last); and every string, also in members stepgate skips, must be
//! valid UTF-8 without lone surrogate escapes. serde_json's own `IgnoredAny` skips a string
//! without looking inside it, so skipped members are walked by [`Strict`] instead, which
//! decodes every string (borrowed where it has no escapes: no allocation) and checks every
//! object's names.

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{self, MapAccess, SeqAccess, Visitor},
};
use serde_json::{Map, Number, Value};

use super::token::KeepClaims;

/// A member's value as the checks read it: strings borrowed from the segment where they carry no
/// escapes, arrays kept only when every item is a string.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw<'a> {
    Null,
    Str(Cow<'a, str>),
    Num(Number),
    /// An array whose items are all strings (possibly none).
    StrList(Vec<Cow<'a, str>>),
    /// Anything else: a boolean, an object, an array holding a non-string.
    Other,
}

impl Raw<'_> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Raw::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The same value for a claim that was also parsed into a [`Value`] (kept for the policy).
    pub(crate) fn from_value(value: &Value) -> Raw<'static> {
        match value {
            Value::Null => Raw::Null,
            Value::String(s) => Raw::Str(Cow::Owned(s.clone())),
            Value::Number(n) => Raw::Num(n.clone()),
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(|s| Cow::Owned(s.to_owned())))
                .collect::<Option<Vec<_>>>()
                .map_or(Raw::Other, Raw::StrList),
            Value::Bool(_) | Value::Object(_) => Raw::Other,
        }
    }
}

/// The header parameters stepgate looks at.
#[derive(Debug, Default)]
pub struct Header<'a> {
    pub alg: Option<Raw<'a>>,
    pub typ: Option<Raw<'a>>,
    pub kid: Option<Raw<'a>>,
    pub jku: bool,
    pub x5u: bool,
    pub jwk: bool,
    pub crit: bool,
    pub nonce: bool,
}

/// The payload claims stepgate reads (`None`: absent), and the raw claims the policy keeps.
#[derive(Debug, Default)]
pub struct Claims<'a> {
    pub iss: Option<Raw<'a>>,
    pub sub: Option<Raw<'a>>,
    pub aud: Option<Raw<'a>>,
    pub exp: Option<Raw<'a>>,
    pub nbf: Option<Raw<'a>>,
    pub iat: Option<Raw<'a>>,
    pub jti: Option<Raw<'a>>,
    pub uti: Option<Raw<'a>>,
    pub tid: Option<Raw<'a>>,
    /// Entra's object id of the user or service principal.
    pub oid: Option<Raw<'a>>,
    pub azp: Option<Raw<'a>>,
    pub appid: Option<Raw<'a>>,
    pub client_id: Option<Raw<'a>>,
    /// Okta's client id.
    pub cid: Option<Raw<'a>>,
    pub scp: Option<Raw<'a>>,
    pub scope: Option<Raw<'a>>,
    pub idtyp: Option<Raw<'a>>,
    pub acrs: Option<Raw<'a>>,
    pub acr: Option<Raw<'a>>,
    pub amr: Option<Raw<'a>>,
    pub auth_time: Option<Raw<'a>>,
    pub roles: Option<Raw<'a>>,
    pub xms_cc: Option<Raw<'a>>,
    /// An ID token's own members (`nonce`, `at_hash`, `c_hash`) are present, or a payload `typ`
    /// (Keycloak's) of `ID`.
    pub id_token_members: bool,
    /// A confirmation (`cnf`, RFC 7800) is present: the token is bound to a key its holder must
    /// prove (DPoP, RFC 9449; a client certificate, RFC 8705).
    pub confirmation: Option<Confirmation>,
    /// The payload's `typ` (Keycloak writes `Bearer` in access tokens, `ID` in ID tokens).
    pub typ: Option<Raw<'a>>,
    /// The claims [`KeepClaims`] selects, as parsed JSON.
    pub kept: Map<String, Value>,
}

/// What a token's `cnf` (RFC 7800) binds it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// A client certificate, by the SHA-256 of its DER (RFC 8705 §3.1, `x5t#S256` as the only
    /// member): the request must come over a TLS connection authenticated with that certificate.
    Certificate([u8; 32]),
    /// A key proved another way (DPoP's `jkt`, RFC 9449; `jwk`, `kid`, `jku`, `jwe`; or more than
    /// one member): stepgate checks no such proof.
    Unverifiable,
    /// Not an object, or an `x5t#S256` that is not the unpadded base64url of 32 bytes.
    Malformed,
}

impl Confirmation {
    pub(crate) fn of(cnf: &Value) -> Self {
        let Value::Object(members) = cnf else {
            return Confirmation::Malformed;
        };
        match members.get("x5t#S256") {
            None => Confirmation::Unverifiable,
            Some(_) if members.len() > 1 => Confirmation::Unverifiable,
            Some(Value::String(thumbprint)) => super::thumbprint::decode(thumbprint)
                .map_or(Confirmation::Malformed, Confirmation::Certificate),
            Some(_) => Confirmation::Malformed,
        }
    }
}

impl<'a> Claims<'a> {
    /// OpenID Connect Core §2 and §3.1.3.6: members only an ID token carries.
    fn id_token_member(&mut self, name: &str) -> Option<&mut bool> {
        matches!(name, "nonce" | "at_hash" | "c_hash").then_some(&mut self.id_token_members)
    }

    /// The slot of a claim stepgate reads, by name.
    pub(crate) fn slot(&mut self, name: &str) -> Option<&mut Option<Raw<'a>>> {
        Some(match name {
            "iss" => &mut self.iss,
            "sub" => &mut self.sub,
            "aud" => &mut self.aud,
            "exp" => &mut self.exp,
            "nbf" => &mut self.nbf,
            "iat" => &mut self.iat,
            "jti" => &mut self.jti,
            "uti" => &mut self.uti,
            "tid" => &mut self.tid,
            "oid" => &mut self.oid,
            "azp" => &mut self.azp,
            "appid" => &mut self.appid,
            "client_id" => &mut self.client_id,
            "scp" => &mut self.scp,
            "scope" => &mut self.scope,
            "idtyp" => &mut self.idtyp,
            "cid" => &mut self.cid,
            "typ" => &mut self.typ,
            "acrs" => &mut self.acrs,
            "acr" => &mut self.acr,
            "amr" => &mut self.amr,
            "auth_time" => &mut self.auth_time,
            "roles" => &mut self.roles,
            "xms_cc" => &mut self.xms_cc,
            _ => return None,
        })
    }
}

/// Reads a decoded header segment; `None` unless it is exactly one JSON object.
pub fn header(bytes: &[u8]) -> Option<Header<'_>> {
    parse(bytes, HeaderVisitor)
}

/// Reads a decoded payload segment, keeping the raw claims `keep` selects; `None` unless it is
/// exactly one JSON object.
pub fn claims<'a>(bytes: &'a [u8], keep: &KeepClaims) -> Option<Claims<'a>> {
    parse(bytes, ClaimsVisitor { keep })
}

fn parse<'a, V: Visitor<'a>>(bytes: &'a [u8], visitor: V) -> Option<V::Value> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = deserializer.deserialize_map(visitor).ok()?;
    deserializer.end().ok()?;
    Some(value)
}

// === impl Deserialize ===

/// A string, borrowed when it has no escapes (map keys and values alike).
struct CowStr<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

impl<'de> Deserialize<'de> for Raw<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Raw::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Raw::Other)
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Raw::Num(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Raw::Num(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Number::from_f64(v).map_or(Raw::Other, Raw::Num))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Raw::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Raw::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Raw::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Some(Vec::new());
        while let Some(item) = seq.next_element::<Raw<'de>>()? {
            match (item, &mut items) {
                (Raw::Str(s), Some(strings)) => strings.push(s),
                _ => items = None,
            }
        }
        Ok(items.map_or(Raw::Other, Raw::StrList))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Strict.visit_map(map).map(|Strict| Raw::Other)
    }
}

// === impl Strict ===

/// Any JSON value, walked and dropped: every string decoded (and so checked), every object's
/// member names checked for repeats. Allocates only for the names of nested objects.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Strict)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Strict;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut names = Names::default();
        while let Some(CowStr(name)) = map.next_key()? {
            names.push(name.clone());
            map.next_value::<Strict>()?;
        }
        names.check()?;
        Ok(Strict)
    }
}

/// A `serde_json::Value` whose objects, at every depth, have no repeated member name (a kept
/// claim the policy reads, where `Value` itself would keep the last of two).
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = StrictValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(StrictValue(Value::Null))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(StrictValue(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(StrictValue(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(StrictValue(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(StrictValue(
                    Number::from_f64(v).map_or(Value::Null, Value::Number),
                ))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(StrictValue(Value::String(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(StrictValue(Value::String(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(StrictValue(item)) = seq.next_element()? {
                    items.push(item);
                }
                Ok(StrictValue(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut object = Map::new();
                while let Some(name) = map.next_key::<String>()? {
                    let StrictValue(value) = map.next_value()?;
                    if object.insert(name, value).is_some() {
                        return Err(de::Error::custom("a member name repeats"));
                    }
                }
                Ok(StrictValue(Value::Object(object)))
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

/// The member names of one object, checked for repeats once the object has been read: sorting a
/// few borrowed names costs less than hashing each one, and stays O(n log n) for a hostile many.
#[derive(Default)]
struct Names<'a>(Vec<Cow<'a, str>>);

impl<'a> Names<'a> {
    /// `name` is a clone of the key read: borrowed from the segment unless it had escapes.
    fn push(&mut self, name: Cow<'a, str>) {
        self.0.push(name);
    }

    fn check<E: de::Error>(mut self) -> Result<(), E> {
        self.0.sort_unstable();
        if self.0.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(E::custom("a member name repeats"));
        }
        Ok(())
    }
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = Header<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JWS header object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut header = Header::default();
        let mut names = Names::default();
        while let Some(CowStr(name)) = map.next_key()? {
            names.push(name.clone());
            let slot = match &*name {
                "alg" => &mut header.alg,
                "typ" => &mut header.typ,
                "kid" => &mut header.kid,
                other => {
                    let flag = match other {
                        "jku" => &mut header.jku,
                        "x5u" => &mut header.x5u,
                        "jwk" => &mut header.jwk,
                        "crit" => &mut header.crit,
                        "nonce" => &mut header.nonce,
                        _ => &mut false,
                    };
                    *flag = true;
                    map.next_value::<Strict>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        names.check()?;
        Ok(header)
    }
}

struct ClaimsVisitor<'k> {
    keep: &'k KeepClaims,
}

impl<'de> Visitor<'de> for ClaimsVisitor<'_> {
    type Value = Claims<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JWT claims object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut claims = Claims::default();
        let mut names = Names::default();
        while let Some(CowStr(name)) = map.next_key()? {
            names.push(name.clone());
            if let Some(flag) = claims.id_token_member(&name) {
                *flag = true;
            }
            if name == "cnf" {
                let StrictValue(value) = map.next_value()?;
                claims.confirmation = Some(Confirmation::of(&value));
                if self.keep.wants(&name) {
                    claims.kept.insert(name.into_owned(), value);
                }
                continue;
            }
            if self.keep.wants(&name) {
                let StrictValue(value) = map.next_value()?;
                if let Some(slot) = claims.slot(&name) {
                    *slot = Some(Raw::from_value(&value));
                }
                claims.kept.insert(name.into_owned(), value);
            } else if let Some(slot) = claims.slot(&name) {
                *slot = Some(map.next_value()?);
            } else {
                map.next_value::<Strict>()?;
            }
        }
        names.check()?;
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(json: &str) -> Claims<'_> {
        claims(json.as_bytes(), &KeepClaims::All).expect("an object")
    }

    #[test]
    fn claims_stepgate_reads_borrow_from_the_segment_and_others_are_skipped() {
        let json = r#"{"iss":"https://i","aud":["a","b"],"exp":1700000000,"nbf":1.5,
            "scp":"read write","xms_cc":null,"roles":["x",1],"extra":{"deep":[1,{"a":2}]}}"#;
        let c = claims(json.as_bytes(), &KeepClaims::Named(Box::new([]))).unwrap();
        assert!(matches!(c.iss, Some(Raw::Str(Cow::Borrowed("https://i")))));
        assert_eq!(c.aud, Some(Raw::StrList(vec!["a".into(), "b".into()])));
        assert_eq!(c.exp, Some(Raw::Num(1_700_000_000.into())));
        assert_eq!(c.nbf, Some(Raw::Num(Number::from_f64(1.5).unwrap())));
        assert_eq!(c.scp, Some(Raw::Str("read write".into())));
        assert_eq!(c.xms_cc, Some(Raw::Null), "null is present, not absent");
        assert_eq!(c.roles, Some(Raw::Other), "an array holding a non-string");
        assert_eq!(c.sub, None);
        assert!(c.kept.is_empty());
    }

    #[test]
    fn escaped_names_and_values_are_read_like_any_json_parser_reads_them() {
        let c = all(r#"{"\u0069ss":"a\"b","sub":"\u00e9"}"#);
        assert_eq!(c.iss.as_ref().and_then(Raw::as_str), Some("a\"b"));
        assert_eq!(c.sub.as_ref().and_then(Raw::as_str), Some("é"));
    }

    #[test]
    fn a_member_name_that_repeats_at_any_depth_is_refused() {
        let keep_none = KeepClaims::Named(Box::new([]));
        let keep_ext = KeepClaims::Named(vec!["ext".to_owned()].into());
        for json in [
            r#"{"sub":"first","sub":"second"}"#,
            r#"{"other":1,"other":2}"#,
            r#"{"sub":"a","\u0073ub":"b"}"#,
            r#"{"ext":{"role":"user","role":"admin"}}"#,
            r#"{"ext":[{"a":1,"a":1}]}"#,
            r#"{"roles":[{"x":1,"x":2}]}"#,
            r#"{"aud":{"a":1,"a":2}}"#,
        ] {
            for keep in [&KeepClaims::All, &keep_none, &keep_ext] {
                assert!(claims(json.as_bytes(), keep).is_none(), "{json} {keep:?}");
            }
            assert!(header(json.as_bytes()).is_none(), "{json}");
        }
        assert!(header(br#"{"alg":"RS256","alg":"none"}"#).is_none());
        assert!(header(br#"{"kid":"a","x":{"y":1,"y":2}}"#).is_none());
        // The same name in two different objects is no repeat.
        assert!(all(r#"{"a":{"x":1},"b":{"x":1},"x":2}"#).kept.len() == 3);
    }

    #[test]
    fn strings_are_checked_even_in_members_that_are_skipped() {
        let keep_none = KeepClaims::Named(Box::new([]));
        let bad: [&[u8]; 6] = [
            b"{\"skipped\":\"\xff\"}",
            // An overlong encoding of "/" (C0 AF) and of NUL (C0 80).
            b"{\"skipped\":\"\xc0\xaf\"}",
            b"{\"skipped\":[\"\xc0\x80\"]}",
            b"{\"skipped\":{\"\xed\xa0\x80\":1}}",
            // A lone surrogate, escaped.
            b"{\"skipped\":\"\\ud800\"}",
            b"{\"nonce\":\"\\udfff\"}",
        ];
        for json in bad {
            for keep in [&KeepClaims::All, &keep_none] {
                assert!(
                    claims(json, keep).is_none(),
                    "{} {keep:?}",
                    String::from_utf8_lossy(json)
                );
            }
            assert!(header(json).is_none(), "{}", String::from_utf8_lossy(json));
            assert!(
                serde_json::from_slice::<Value>(json).is_err(),
                "serde_json agrees"
            );
        }
    }

    #[test]
    fn id_token_members_are_noted() {
        for member in ["nonce", "at_hash", "c_hash"] {
            let json = format!(r#"{{"sub":"s","{member}":"x"}}"#);
            assert!(all(&json).id_token_members, "{member}");
        }
        assert!(!all(r#"{"sub":"s","nonces":1}"#).id_token_members);
    }

    #[test]
    fn reads_what_serde_json_reads_and_refuses_what_it_refuses_or_would_merge() {
        let cases = [
            r#"{"iss":"https://i","sub":"s","aud":["a"],"exp":1,"ext":{"a":[1,{"b":null}]}}"#,
            r#"{"sub":"a","sub":"b"}"#,
            r#"{"x":{"k":1,"k":2}}"#,
            r#"{"x":[{"k":1},{"k":2}]}"#,
            r#"{"sub":"\u00e9\ud83d\ude00"}"#,
            r#"{"sub":"\ud83d"}"#,
            r#"{"n":1e400}"#,
            r#"{"n":-0.0,"m":18446744073709551615,"o":-9223372036854775808}"#,
            r#"[]"#,
            r#"{"a":1} "#,
            r#"{"a":1}{}"#,
            "{\"a\":\"\t\"}",
        ];
        for json in cases {
            let expected = crate::fuzzing::jws::reference(json.as_bytes());
            let ours = claims(json.as_bytes(), &KeepClaims::All).map(|c| c.kept);
            assert_eq!(ours, expected, "{json}");
        }
    }

    #[test]
    fn kept_claims_are_parsed_json_and_still_read_by_the_checks() {
        let json = r#"{"tid":"t1","department":{"name":"ops"},"sub":"s","other":true}"#;
        let keep = KeepClaims::Named(vec!["tid".to_owned(), "department".to_owned()].into());
        let c = claims(json.as_bytes(), &keep).unwrap();
        assert_eq!(c.tid.as_ref().and_then(Raw::as_str), Some("t1"));
        assert_eq!(c.sub.as_ref().and_then(Raw::as_str), Some("s"));
        assert_eq!(
            Value::Object(c.kept),
            serde_json::json!({"tid": "t1", "department": {"name": "ops"}})
        );
        let every = all(json);
        assert_eq!(every.kept.len(), 4);
        assert_eq!(every.tid.as_ref().and_then(Raw::as_str), Some("t1"));
    }

    #[test]
    fn anything_but_exactly_one_object_is_refused() {
        for bad in [
            "[]",
            r#""iss""#,
            "null",
            r#"{"iss":"a"} {}"#,
            r#"{"iss":"a"}x"#,
            r#"{"iss":"a""#,
            r#"{"iss":"a",}"#,
            "",
        ] {
            assert!(
                claims(bad.as_bytes(), &KeepClaims::All).is_none(),
                "{bad:?}"
            );
            assert!(header(bad.as_bytes()).is_none(), "{bad:?}");
        }
        assert!(
            claims(b"{} \n", &KeepClaims::All).is_some(),
            "trailing space"
        );
    }

    #[test]
    fn header_notes_the_parameters_that_are_refused_whatever_their_value() {
        let h = header(br#"{"alg":"RS256","kid":7,"jwk":null,"crit":[],"x":1}"#).unwrap();
        assert_eq!(h.alg.as_ref().and_then(Raw::as_str), Some("RS256"));
        assert_eq!(h.kid, Some(Raw::Num(7.into())));
        assert!(h.jwk && h.crit && !h.jku && !h.x5u && !h.nonce && h.typ.is_none());
    }
}
