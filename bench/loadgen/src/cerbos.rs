//! The peer baseline: Cerbos's `cerbos.svc.v1.CerbosService/CheckResources` with the bearer token
//! in `aux_data.jwt.token`, so that Cerbos verifies the JWT (through its verified-token cache) and
//! evaluates a policy equivalent to stepgate's ordinary ALLOW (`bench/cerbos/policies/order.yaml`).
//!
//! Only the messages and fields the benchmark sends or reads are declared here, with the field
//! numbers and types of Cerbos's public protos (`api/public/cerbos/{request,response,engine,effect}
//! /v1/*.proto` in github.com/cerbos/cerbos). Fields left out are skipped as unknown fields when an
//! answer is decoded, and never sent.

use std::collections::HashMap;

use base64::Engine as _;
use bytes::Bytes;
use prost::Message as _;

use crate::scenario::{Call, Expect};

/// The gRPC method.
pub const CHECK_RESOURCES_PATH: &str = "/cerbos.svc.v1.CerbosService/CheckResources";

/// How the benchmark's HTTP request (`GET /api/orders/42`) reads as a Cerbos check: the principal
/// (with this role) performs `ACTION` on resource `KIND` number 42.
pub const ROLE: &str = "user";
pub const KIND: &str = "order";
pub const ACTION: &str = "read";

/// `cerbos.request.v1.CheckResourcesRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckResourcesRequest {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(bool, tag = "2")]
    pub include_meta: bool,
    #[prost(message, optional, tag = "3")]
    pub principal: Option<Principal>,
    #[prost(message, repeated, tag = "4")]
    pub resources: Vec<ResourceEntry>,
    #[prost(message, optional, tag = "5")]
    pub aux_data: Option<AuxData>,
}

/// `cerbos.request.v1.CheckResourcesRequest.ResourceEntry`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceEntry {
    #[prost(string, repeated, tag = "1")]
    pub actions: Vec<String>,
    #[prost(message, optional, tag = "2")]
    pub resource: Option<Resource>,
}

/// `cerbos.engine.v1.Principal` (without `attr` = 4 and `scope` = 5).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Principal {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub policy_version: String,
    #[prost(string, repeated, tag = "3")]
    pub roles: Vec<String>,
}

/// `cerbos.engine.v1.Resource` (without `attr` = 4 and `scope` = 5).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(string, tag = "1")]
    pub kind: String,
    #[prost(string, tag = "2")]
    pub policy_version: String,
    #[prost(string, tag = "3")]
    pub id: String,
}

/// `cerbos.request.v1.AuxData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuxData {
    #[prost(message, optional, tag = "1")]
    pub jwt: Option<Jwt>,
}

/// `cerbos.request.v1.AuxData.JWT`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Jwt {
    #[prost(string, tag = "1")]
    pub token: String,
    #[prost(string, tag = "2")]
    pub key_set_id: String,
}

/// `cerbos.response.v1.CheckResourcesResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckResourcesResponse {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(message, repeated, tag = "2")]
    pub results: Vec<ResultEntry>,
    #[prost(string, tag = "3")]
    pub cerbos_call_id: String,
}

/// `cerbos.response.v1.CheckResourcesResponse.ResultEntry` (without `validation_errors` = 3,
/// `meta` = 4 and `outputs` = 5).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResultEntry {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<ResultResource>,
    #[prost(map = "string, enumeration(Effect)", tag = "2")]
    pub actions: HashMap<String, i32>,
}

/// `cerbos.response.v1.CheckResourcesResponse.ResultEntry.Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResultResource {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub kind: String,
    #[prost(string, tag = "3")]
    pub policy_version: String,
    #[prost(string, tag = "4")]
    pub scope: String,
}

/// `cerbos.effect.v1.Effect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Effect {
    Unspecified = 0,
    Allow = 1,
    Deny = 2,
    NoMatch = 3,
}

impl Effect {
    /// The name in Cerbos's proto (and its JSON answers).
    pub fn name(self) -> &'static str {
        match self {
            Effect::Unspecified => "EFFECT_UNSPECIFIED",
            Effect::Allow => "EFFECT_ALLOW",
            Effect::Deny => "EFFECT_DENY",
            Effect::NoMatch => "EFFECT_NO_MATCH",
        }
    }
}

/// The `sub` claim of a JWT, read without verifying it (the generator only needs it to name the
/// principal the way an application would: Cerbos verifies the token itself).
pub fn token_subject(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_owned)
}

/// The resource id of `call`: the last path segment without the query (`/api/orders/42?x` → `42`).
fn resource_id(call: &Call) -> &str {
    let path = call.path.split('?').next().unwrap_or_default();
    path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("0")
}

/// The request for `token`: principal = the token's subject with role `user`, `read` on
/// `order` 42, the token in `aux_data.jwt` (the only key set configured, so no key set id).
pub fn check_resources(call: &Call, token: &str) -> CheckResourcesRequest {
    CheckResourcesRequest {
        request_id: String::new(),
        include_meta: false,
        principal: Some(Principal {
            id: token_subject(token).unwrap_or_else(|| "unknown".into()),
            policy_version: String::new(),
            roles: vec![ROLE.into()],
        }),
        resources: vec![ResourceEntry {
            actions: vec![ACTION.into()],
            resource: Some(Resource {
                kind: KIND.into(),
                policy_version: String::new(),
                id: resource_id(call).into(),
            }),
        }],
        aux_data: Some(AuxData {
            jwt: Some(Jwt {
                token: token.into(),
                key_set_id: String::new(),
            }),
        }),
    }
}

pub fn encode(call: &Call, token: &str) -> Bytes {
    check_resources(call, token).encode_to_vec().into()
}

/// Checks an encoded `CheckResourcesResponse`: the one resource must have `EFFECT_ALLOW` for
/// `read`. Anything else (DENY, NO_MATCH, a missing action or resource) is a wrong answer.
pub fn validate(expect: Expect, body: &[u8]) -> Result<(), String> {
    let response = CheckResourcesResponse::decode(body)
        .map_err(|e| format!("undecodable CheckResourcesResponse: {e}"))?;
    validate_response(expect, &response)
}

pub fn validate_response(expect: Expect, response: &CheckResourcesResponse) -> Result<(), String> {
    if expect != Expect::Allow {
        return Err(format!(
            "Cerbos rows expect ALLOW only, not {expect:?} (see scenario::supports)"
        ));
    }
    let [result] = response.results.as_slice() else {
        return Err(format!(
            "expected one resource result, got {}",
            response.results.len()
        ));
    };
    match result.actions.get(ACTION).map(|&e| Effect::try_from(e)) {
        Some(Ok(Effect::Allow)) => Ok(()),
        Some(Ok(other)) => Err(format!(
            "expected EFFECT_ALLOW for {ACTION}, got {}",
            other.name()
        )),
        Some(Err(_)) => Err(format!("unknown effect for {ACTION}")),
        None => Err(format!("no effect for {ACTION} in the answer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;

    fn answer(effects: &[(&str, Effect)]) -> CheckResourcesResponse {
        CheckResourcesResponse {
            request_id: String::new(),
            results: vec![ResultEntry {
                resource: Some(ResultResource {
                    id: "42".into(),
                    kind: KIND.into(),
                    ..Default::default()
                }),
                actions: effects
                    .iter()
                    .map(|(a, e)| ((*a).to_owned(), *e as i32))
                    .collect(),
            }],
            cerbos_call_id: "01ABC".into(),
        }
    }

    #[test]
    fn only_allow_for_read_is_the_right_answer() {
        let allow = answer(&[(ACTION, Effect::Allow)]);
        assert_eq!(validate_response(Expect::Allow, &allow), Ok(()));
        // The same answer through the wire format.
        assert_eq!(validate(Expect::Allow, &allow.encode_to_vec()), Ok(()));

        let deny = answer(&[(ACTION, Effect::Deny)]);
        let err = validate_response(Expect::Allow, &deny).unwrap_err();
        assert!(err.contains("EFFECT_DENY"), "{err}");
        let no_match = answer(&[(ACTION, Effect::NoMatch)]);
        assert!(
            validate_response(Expect::Allow, &no_match)
                .unwrap_err()
                .contains("EFFECT_NO_MATCH")
        );
        let other_action = answer(&[("write", Effect::Allow)]);
        assert!(validate_response(Expect::Allow, &other_action).is_err());
        let empty = CheckResourcesResponse::default();
        assert!(validate_response(Expect::Allow, &empty).is_err());
        let mut two = answer(&[(ACTION, Effect::Allow)]);
        two.results.push(two.results[0].clone());
        assert!(validate_response(Expect::Allow, &two).is_err());
        assert!(validate(Expect::Allow, b"\xff\xff").is_err());
        let step_up = Expect::StepUp { missing: "c1" };
        assert!(validate_response(step_up, &allow).is_err());
    }

    #[test]
    fn the_request_carries_the_token_and_its_subject() {
        let token = crate::tokens::mint(
            &crate::tokens::default_keys_dir(),
            &stepgate::demo::TokenSpec::default(),
            jsonwebtoken::Algorithm::RS256,
        )
        .unwrap();
        assert_eq!(token_subject(&token).as_deref(), Some("alice"));
        let request = CheckResourcesRequest::decode(encode(&Scenario::A.call(), &token)).unwrap();
        let principal = request.principal.unwrap();
        assert_eq!(principal.id, "alice");
        assert_eq!(principal.roles, [ROLE]);
        let entry = &request.resources[0];
        assert_eq!(entry.actions, [ACTION]);
        let resource = entry.resource.as_ref().unwrap();
        assert_eq!((resource.kind.as_str(), resource.id.as_str()), (KIND, "42"));
        assert_eq!(request.aux_data.unwrap().jwt.unwrap().token, token);
        assert_eq!(token_subject("not a token"), None);
        assert_eq!(token_subject("a.!!!.c"), None);
    }

    #[test]
    fn field_numbers_match_cerbos() {
        // Hand-encoded bytes of `{principal: {id: "p", roles: ["user"]}, aux_data: {jwt: {token:
        // "t"}}}` with Cerbos's field numbers: principal = 3 (id = 1, roles = 3), aux_data = 5
        // (jwt = 1, token = 1).
        let request = CheckResourcesRequest {
            principal: Some(Principal {
                id: "p".into(),
                policy_version: String::new(),
                roles: vec!["user".into()],
            }),
            aux_data: Some(AuxData {
                jwt: Some(Jwt {
                    token: "t".into(),
                    key_set_id: String::new(),
                }),
            }),
            ..Default::default()
        };
        assert_eq!(
            request.encode_to_vec(),
            b"\x1a\x09\x0a\x01p\x1a\x04user\x2a\x05\x0a\x03\x0a\x01t"
        );
        // A response entry: results = 2, resource = 1 (id = 1), actions = 2 as map entries
        // {key = 1, value = 2}.
        let wire = b"\x12\x10\x0a\x04\x0a\x0242\x12\x08\x0a\x04read\x10\x01";
        let response = CheckResourcesResponse::decode(&wire[..]).unwrap();
        assert_eq!(response.results[0].resource.as_ref().unwrap().id, "42");
        assert_eq!(validate_response(Expect::Allow, &response), Ok(()));
    }
}
