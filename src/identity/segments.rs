//! The JWS header and payload, read in one pass into the fields stepgate decides on.
//!
//! Every uncached token is parsed, so the parse is on the hot path: a generic `serde_json` map
//! allocates every key and value of a 20-claim payload and hashes each key, which cost more than
//! the rest of the decision put together. Here each member is matched by name as it streams past:
//! a claim stepgate reads is kept as a [`Raw`] value borrowed from the decoded bytes, a claim the
//! policy keeps (see [`KeepClaims`]) is parsed into a `serde_json::Value`, and anything else is
//! skipped without allocating. The reading stays as strict as a full parse: the segment must be
//! one JSON object with nothing after it, and a repeated member takes its last value, as a map
//! would.

use std::{borrow::Cow, fmt};

use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, SeqAccess, Visitor},
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
    fn from_value(value: &Value) -> Raw<'static> {
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
    pub tid: Option<Raw<'a>>,
    pub azp: Option<Raw<'a>>,
    pub appid: Option<Raw<'a>>,
    pub client_id: Option<Raw<'a>>,
    pub scp: Option<Raw<'a>>,
    pub scope: Option<Raw<'a>>,
    pub idtyp: Option<Raw<'a>>,
    pub acrs: Option<Raw<'a>>,
    pub acr: Option<Raw<'a>>,
    pub amr: Option<Raw<'a>>,
    pub auth_time: Option<Raw<'a>>,
    pub roles: Option<Raw<'a>>,
    pub xms_cc: Option<Raw<'a>>,
    /// The claims [`KeepClaims`] selects, as parsed JSON.
    pub kept: Map<String, Value>,
}

impl<'a> Claims<'a> {
    fn slot(&mut self, name: &str) -> Option<&mut Option<Raw<'a>>> {
        Some(match name {
            "iss" => &mut self.iss,
            "sub" => &mut self.sub,
            "aud" => &mut self.aud,
            "exp" => &mut self.exp,
            "nbf" => &mut self.nbf,
            "tid" => &mut self.tid,
            "azp" => &mut self.azp,
            "appid" => &mut self.appid,
            "client_id" => &mut self.client_id,
            "scp" => &mut self.scp,
            "scope" => &mut self.scope,
            "idtyp" => &mut self.idtyp,
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
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Raw::Other)
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
        while let Some(CowStr(name)) = map.next_key()? {
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
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
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
        while let Some(CowStr(name)) = map.next_key()? {
            if self.keep.wants(&name) {
                let value: Value = map.next_value()?;
                if let Some(slot) = claims.slot(&name) {
                    *slot = Some(Raw::from_value(&value));
                }
                claims.kept.insert(name.into_owned(), value);
            } else if let Some(slot) = claims.slot(&name) {
                *slot = Some(map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
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
    fn a_repeated_member_takes_its_last_value_as_a_map_would() {
        let c = all(r#"{"sub":"first","sub":"second","tid":1,"tid":"t"}"#);
        assert_eq!(c.sub.as_ref().and_then(Raw::as_str), Some("second"));
        assert_eq!(c.tid.as_ref().and_then(Raw::as_str), Some("t"));
        assert_eq!(c.kept.get("sub"), Some(&Value::from("second")));
        assert_eq!(c.kept.len(), 2);
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
