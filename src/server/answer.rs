//! The ext_authz `CheckResponse`, encoded straight from a [`Decision`].
//!
//! Building envoy-types' `CheckResponse` first meant about 30 small allocations per answer: every
//! header name and value, every dynamic-metadata key and value copied into its own `String`, a
//! hash map for the metadata, then all of it dropped once encoded. With Envoy asking about every
//! request, and each allocation a likely cache miss when requests arrive one at a time, that was
//! a measurable share of stepgate's cost over an empty ext_authz server. [`CheckAnswer`] writes the
//! same protobuf fields from the decision's own strings instead.
//!
//! What is encoded (field numbers from `envoy/service/auth/v3/external_auth.proto` and the types
//! it uses):
//!
//! - `status` (1, `google.rpc.Status`): `code` 0 for ALLOW; otherwise the gRPC code matching the
//!   HTTP status, with the reason code as `message`.
//! - ALLOW: `ok_response` (3): `headers` (2) as `HeaderValueOption{header{key, value},
//!   append_action: OVERWRITE_IF_EXISTS_OR_ADD}`, and `headers_to_remove` (5).
//! - otherwise: `denied_response` (2): `status` (1, `HttpStatus{code}`), `headers` (2: the
//!   content type and, when there is a challenge, `www-authenticate`), `body` (3, JSON).
//! - `dynamic_metadata` (4, `google.protobuf.Struct`): `stepgate.*` string fields.
//!
//! Like prost, it leaves out scalar fields that hold their default (0, empty string). The bytes are
//! written in one pass into one buffer when the answer is made: a nested message gets a one-byte
//! length that is widened in place in the rare case its body reaches 128 bytes. Tests decode the
//! bytes with envoy-types' own `CheckResponse`.

use std::sync::Arc;

use bytes::Bytes;

use envoy_types::ext_authz::v3::pb::HeaderAppendAction;
use prost::{
    DecodeError,
    bytes::{Buf, BufMut},
    encoding::{DecodeContext, WireType, encode_varint, skip_field},
};

use super::grpc_message::PREFIX;
use crate::{
    decision::{Decision, Outcome},
    policy::Policy,
};

/// gRPC status codes used in `CheckResponse.status` (google.rpc.Code).
const OK: u64 = 0;
const INVALID_ARGUMENT: u64 = 3;
const PERMISSION_DENIED: u64 = 7;
const RESOURCE_EXHAUSTED: u64 = 8;
const INTERNAL: u64 = 13;
const UNAUTHENTICATED: u64 = 16;

/// A decision as the `CheckResponse` Envoy receives. Encode-only: decoding one skips every field.
#[derive(Debug)]
pub struct CheckAnswer {
    decision: Decision,
    /// Room for the gRPC message prefix ([`PREFIX`] bytes), then the encoded `CheckResponse`.
    bytes: Vec<u8>,
}

impl CheckAnswer {
    /// Encodes `decision`, made under `policy` (which names the identity headers to remove).
    pub fn new(decision: Decision, policy: &Policy) -> Self {
        let mut out = Out(Vec::with_capacity(512));
        out.0.resize(PREFIX, 0);
        write(&mut out, &decision, policy);
        Self {
            decision,
            bytes: out.0,
        }
    }

    pub fn decision(&self) -> &Decision {
        &self.decision
    }

    /// The answer as a gRPC message frame (not compressed), in the buffer it was encoded into.
    pub fn into_frame(self) -> Bytes {
        let mut bytes = self.bytes;
        let len = u32::try_from(bytes.len() - PREFIX).expect("an answer is far below 4 GiB");
        bytes[1..PREFIX].copy_from_slice(&len.to_be_bytes());
        // A `Vec` with spare capacity would become `Bytes` through one more allocation; the
        // allocator shrinks a block in place when less than half of it is cut.
        bytes.shrink_to_fit();
        Bytes::from(bytes)
    }
}

impl prost::Message for CheckAnswer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes[PREFIX..]);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len() - PREFIX
    }

    fn clear(&mut self) {
        self.bytes.truncate(PREFIX);
    }
}

fn write(out: &mut Out, d: &Decision, policy: &Policy) {
    let code = match (d.outcome, d.http_status) {
        (Outcome::Allow, _) => OK,
        (_, 400) => INVALID_ARGUMENT,
        (_, 401) => UNAUTHENTICATED,
        (_, 413 | 431) => RESOURCE_EXHAUSTED,
        (_, 500) => INTERNAL,
        _ => PERMISSION_DENIED,
    };
    out.message(1, |out| {
        out.uint(1, code);
        if code != OK {
            out.string(2, d.reason.as_str());
        }
    });
    if d.is_allow() {
        out.message(3, |out| {
            for (name, value) in &d.identity_headers {
                out.header_option(2, name, value);
            }
            for name in policy.upstream.headers_to_remove(&d.identity_headers) {
                out.string(5, name);
            }
            for name in &d.stray_headers {
                out.string(5, name);
            }
        });
    } else {
        out.message(2, |out| {
            out.message(1, |out| out.uint(1, u64::from(d.http_status)));
            out.header_option(2, "content-type", "application/json");
            if let Some(www) = &d.www_authenticate {
                out.header_option(2, "www-authenticate", www);
            }
            out.string(3, &denial_body(d));
        });
    }
    out.message(4, |out| dynamic_metadata(out, d));
}

/// Fields for Envoy's access log and later filters, under `envoy.filters.http.ext_authz`.
fn dynamic_metadata(out: &mut Out, d: &Decision) {
    out.text_field("stepgate.outcome", d.outcome.as_str());
    out.text_field("stepgate.reason", d.reason.as_str());
    out.text_field("stepgate.rule", d.rule.as_deref().unwrap_or_default());
    if let Some(fingerprint) = &d.token_fingerprint {
        out.text_field("stepgate.token", fingerprint);
    }
    if let Some(block) = &d.block {
        out.text_field("stepgate.block", block);
    }
    if !d.shadow.is_empty() {
        out.text_field("stepgate.shadow", &crate::telemetry::shadow_text(&d.shadow));
    }
    if let Some(p) = &d.principal {
        out.text_field("stepgate.subject", &p.subject);
        out.text_field("stepgate.issuer", &p.issuer_id);
        if let Some(tenant) = &p.tenant {
            out.text_field("stepgate.tenant", tenant);
        }
        if !p.acrs.is_empty() {
            out.field("stepgate.auth_contexts", |out| out.words(3, &p.acrs));
        }
    }
}

/// `{"error": …, "reason": …, "rule": …, "message": …}`; `error` is the OAuth error code of the
/// challenge when there is one.
pub fn denial_body(decision: &Decision) -> String {
    let error = decision
        .www_authenticate
        .as_deref()
        .and_then(|www| www.split("error=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or(match decision.outcome {
            Outcome::StepUp => "insufficient_user_authentication",
            _ if decision.http_status == 401 => "unauthorized",
            _ => "access_denied",
        });
    serde_json::json!({
        "error": error,
        "reason": decision.reason.as_str(),
        "rule": decision.rule.as_deref(),
        "message": decision.message,
    })
    .to_string()
}

/// Protobuf fields appended to a buffer.
struct Out(Vec<u8>);

impl Out {
    fn key(&mut self, tag: u32, wire_type: WireType) {
        encode_varint((u64::from(tag) << 3) | wire_type as u64, &mut self.0);
    }

    /// A varint field, left out when 0 (the proto3 default).
    fn uint(&mut self, tag: u32, value: u64) {
        if value != 0 {
            self.key(tag, WireType::Varint);
            encode_varint(value, &mut self.0);
        }
    }

    /// A string field, written even when empty (callers leave out defaults themselves).
    fn string(&mut self, tag: u32, value: &str) {
        self.key(tag, WireType::LengthDelimited);
        encode_varint(value.len() as u64, &mut self.0);
        self.0.extend_from_slice(value.as_bytes());
    }

    /// Words joined by single spaces, as one string field, without joining them first.
    fn words(&mut self, tag: u32, words: &[Arc<str>]) {
        let len = words.iter().map(|w| w.len()).sum::<usize>() + words.len().saturating_sub(1);
        self.key(tag, WireType::LengthDelimited);
        encode_varint(len as u64, &mut self.0);
        for (i, word) in words.iter().enumerate() {
            if i > 0 {
                self.0.push(b' ');
            }
            self.0.extend_from_slice(word.as_bytes());
        }
    }

    /// A nested message: a length byte, the fields, then the length written in (widened to a
    /// longer varint, moving the fields, when they took 128 bytes or more).
    fn message(&mut self, tag: u32, body: impl FnOnce(&mut Self)) {
        self.key(tag, WireType::LengthDelimited);
        let at = self.0.len();
        self.0.push(0);
        body(self);
        let len = self.0.len() - at - 1;
        if len < 0x80 {
            self.0[at] = len as u8;
        } else {
            let mut prefix = [0u8; 10];
            let mut rest = &mut prefix[..];
            encode_varint(len as u64, &mut rest);
            let width = 10 - rest.len();
            self.0.splice(at..=at, prefix[..width].iter().copied());
        }
    }

    /// `HeaderValueOption{header: HeaderValue{key, value}, append_action:
    /// OVERWRITE_IF_EXISTS_OR_ADD}`.
    fn header_option(&mut self, tag: u32, key: &str, value: &str) {
        self.message(tag, |out| {
            out.message(1, |out| {
                out.string(1, key);
                out.string(2, value);
            });
            out.uint(3, HeaderAppendAction::OverwriteIfExistsOrAdd as u64);
        });
    }

    /// One entry of a `Struct`'s `fields` map (1): the key (1) and a `Value` (2).
    fn field(&mut self, key: &str, value: impl FnOnce(&mut Self)) {
        self.message(1, |out| {
            out.string(1, key);
            out.message(2, value);
        });
    }

    /// A `fields` entry whose `Value` is a `string_value` (3): a oneof, written even when empty.
    fn text_field(&mut self, key: &str, text: &str) {
        self.field(key, |out| out.string(3, text));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::{
        ext_authz::v3::pb::{CheckResponse, HttpResponse},
        pb::google::protobuf::value::Kind,
    };
    use prost::Message as _;

    use super::*;
    use crate::{
        decision::Reason,
        identity::Principal,
        policy::testing::{DEMO_POLICY, compile_policy},
    };

    /// The demo policy (identity headers `x-stepgate-*`), also removing `authorization`.
    fn policy() -> Arc<Policy> {
        let yaml = DEMO_POLICY.replace("remove_authorization: false", "remove_authorization: true");
        Arc::new(compile_policy(&yaml))
    }

    fn decision(outcome: Outcome, reason: Reason, http_status: u16) -> Decision {
        Decision {
            rule: Some("payments".into()),
            ..Decision::new(outcome, reason, "why", http_status)
        }
    }

    fn principal(tenant: Option<&str>, acrs: &[&str]) -> Arc<Principal> {
        Arc::new(Principal {
            issuer_id: "entra".into(),
            issuer: "https://login.microsoftonline.com/t/v2.0".into(),
            subject: "alice".into(),
            tenant: tenant.map(Into::into),
            client_id: None,
            acrs: acrs.iter().map(|&a| Arc::from(a)).collect(),
            acr: None,
            amr: Arc::from([]),
            auth_time: None,
            issued_at: None,
            token_id: None,
            claims_challenge_capable: false,
            scopes: Arc::from([]),
            roles: Arc::from([]),
            app_only: false,
            expires_at: 0,
        })
    }

    /// Encodes, checks the announced length, and decodes with envoy-types' own message.
    fn decoded(decision: Decision, policy: Arc<Policy>) -> CheckResponse {
        let answer = CheckAnswer::new(decision, &policy);
        let bytes = answer.encode_to_vec();
        assert_eq!(answer.encoded_len(), bytes.len());
        CheckResponse::decode(bytes.as_slice()).expect("envoy-types decodes the answer")
    }

    fn metadata(response: &CheckResponse) -> HashMap<String, String> {
        let fields = &response.dynamic_metadata.as_ref().expect("metadata").fields;
        fields
            .iter()
            .map(|(k, v)| match &v.kind {
                Some(Kind::StringValue(s)) => (k.clone(), s.clone()),
                other => panic!("{k}: not a string value: {other:?}"),
            })
            .collect()
    }

    fn pairs(entries: &[(&str, &str)]) -> HashMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn allow_carries_identity_headers_removals_and_metadata() {
        let policy = policy();
        let mut d = decision(Outcome::Allow, Reason::Allowed, 200);
        d.principal = Some(principal(Some("t1"), &["c1", "c2"]));
        d.token_fingerprint = Some("sha256:abcd".to_owned());
        d.identity_headers = vec![
            (Arc::from("x-stepgate-subject"), Arc::from("alice")),
            (Arc::from("x-stepgate-auth-contexts"), Arc::from("c1 c2")),
        ];
        let set = d.identity_headers.clone();
        let response = decoded(d, Arc::clone(&policy));

        let status = response.status.as_ref().expect("status is present");
        assert_eq!((status.code, status.message.as_str()), (0, ""));
        let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
            panic!("not an ok_response: {response:?}");
        };
        let headers: Vec<(String, String, i32)> = ok
            .headers
            .iter()
            .map(|h| {
                let hv = h.header.as_ref().expect("header");
                (hv.key.clone(), hv.value.clone(), h.append_action)
            })
            .collect();
        let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
        assert_eq!(
            headers,
            set.iter()
                .map(|(k, v)| (k.to_string(), v.to_string(), overwrite))
                .collect::<Vec<_>>()
        );
        let expected_removed: Vec<&str> = policy.upstream.headers_to_remove(&set).collect();
        assert!(expected_removed.contains(&"authorization"));
        assert!(expected_removed.len() > 1, "{expected_removed:?}");
        assert_eq!(ok.headers_to_remove, expected_removed);
        assert_eq!(
            metadata(&response),
            pairs(&[
                ("stepgate.outcome", "ALLOW"),
                ("stepgate.reason", "allowed"),
                ("stepgate.rule", "payments"),
                ("stepgate.token", "sha256:abcd"),
                ("stepgate.subject", "alice"),
                ("stepgate.issuer", "entra"),
                ("stepgate.tenant", "t1"),
                ("stepgate.auth_contexts", "c1 c2"),
            ])
        );
    }

    #[test]
    fn step_up_carries_status_challenge_and_body() {
        let mut d = decision(Outcome::StepUp, Reason::MissingAuthContext, 401);
        d.www_authenticate =
            Some("Bearer realm=\"\", error=\"insufficient_claims\", claims=\"eyJ9\"".to_owned());
        d.principal = Some(principal(None, &[]));
        let www = d.www_authenticate.clone();
        let response = decoded(d, policy());

        let status = response.status.as_ref().expect("status");
        assert_eq!(status.code, 16, "UNAUTHENTICATED");
        assert_eq!(status.message, Reason::MissingAuthContext.as_str());
        let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
            panic!("not a denied_response: {response:?}");
        };
        assert_eq!(denied.status.as_ref().map(|s| s.code), Some(401));
        let headers: Vec<(&str, &str)> = denied
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .map(|h| (h.key.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(
            headers,
            [
                ("content-type", "application/json"),
                ("www-authenticate", www.as_deref().unwrap()),
            ]
        );
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(body["error"], "insufficient_claims");
        assert_eq!(body["reason"], Reason::MissingAuthContext.as_str());
        assert_eq!(body["rule"], "payments");
        assert_eq!(body["message"], "why");
        let meta = metadata(&response);
        assert_eq!(meta["stepgate.outcome"], "STEP_UP");
        assert!(!meta.contains_key("stepgate.tenant"));
        assert!(!meta.contains_key("stepgate.auth_contexts"));
    }

    #[test]
    fn denials_map_http_status_to_grpc_codes_and_empty_fields_stay() {
        for (status, reason, code) in [
            (400, Reason::InvalidPath, 3),
            (401, Reason::TokenMissing, 16),
            (403, Reason::MissingScope, 7),
            (431, Reason::TooManyHeaders, 8),
        ] {
            let mut d = decision(Outcome::Deny, reason, status);
            d.rule = None;
            let response = decoded(d, policy());
            assert_eq!(response.status.as_ref().map(|s| s.code), Some(code));
            let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
                panic!("not a denied_response: {response:?}");
            };
            assert_eq!(
                denied.status.as_ref().map(|s| s.code),
                Some(i32::from(status))
            );
            let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
            let error = if status == 401 {
                "unauthorized"
            } else {
                "access_denied"
            };
            assert_eq!(body["error"], error);
            assert_eq!(body["rule"], serde_json::Value::Null);
            // No rule: the metadata field is there, empty; no token or principal: no fields.
            assert_eq!(
                metadata(&response),
                pairs(&[
                    ("stepgate.outcome", "DENY"),
                    ("stepgate.reason", reason.as_str()),
                    ("stepgate.rule", ""),
                ])
            );
        }
    }

    #[test]
    fn long_fields_get_multi_byte_length_prefixes() {
        let mut d = decision(Outcome::Allow, Reason::Allowed, 200);
        d.identity_headers = vec![(
            Arc::from("x-stepgate-subject"),
            Arc::from("r".repeat(70_000)),
        )];
        let response = decoded(d, policy());
        let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
            panic!("not an ok_response");
        };
        let value = &ok.headers[0].header.as_ref().unwrap().value;
        assert_eq!(value.len(), 70_000);
    }
}
