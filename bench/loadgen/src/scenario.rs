//! The benchmark scenarios: which token, which request, and which answer is the right one.
//!
//! Every response is checked against the scenario's expectation, and a mismatch is an error: a
//! server that answers wrongly (or a baseline that cannot answer the scenario) cannot look fast.

use std::{collections::HashMap, sync::LazyLock};

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use jsonwebtoken::Algorithm;
use prost::Message as _;
use stepgate::{
    api::v1::{DecideRequest, DecideResponse, HttpRequest, Outcome, decide_request},
    demo::{TokenSpec, envoy_check_request},
};

use crate::cerbos;

/// What carries the request: a gRPC method, or plain HTTP (through Envoy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rpc {
    /// `envoy.service.auth.v3.Authorization/Check`, shaped as Envoy sends it.
    Check,
    /// `stepgate.v1.DecisionService/Decide`.
    Decide,
    /// Cerbos's `cerbos.svc.v1.CerbosService/CheckResources`, the token in `aux_data.jwt`.
    Cerbos,
    /// An HTTP/1.1 request with `Authorization: Bearer …` (to Envoy); 200 is the right answer.
    Http,
}

impl Rpc {
    /// The gRPC method path (`None` for HTTP).
    pub fn grpc_path(self) -> Option<&'static str> {
        match self {
            Rpc::Check => Some("/envoy.service.auth.v3.Authorization/Check"),
            Rpc::Decide => Some("/stepgate.v1.DecisionService/Decide"),
            Rpc::Cerbos => Some(cerbos::CHECK_RESOURCES_PATH),
            Rpc::Http => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Rpc::Check => "check",
            Rpc::Decide => "decide",
            Rpc::Cerbos => "cerbos",
            Rpc::Http => "http",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Allowed request, the same token every time (the verified-token cache answers).
    #[value(name = "a")]
    A,
    /// As a, the token bound to the client certificate the request comes with (RFC 8705): Envoy's
    /// URL-encoded PEM in `source.certificate` (a `Decide`'s DER), read and hashed on every
    /// request.
    #[value(name = "a-bound")]
    ABound,
    /// Allowed requests, a distinct RS256 token each (every one is verified).
    #[value(name = "b-rs256")]
    BRs256,
    /// Allowed requests, a distinct ES256 token each.
    #[value(name = "b-es256")]
    BEs256,
    /// Wire transfer without MFA from a capable client: STEP_UP with the Entra claims challenge.
    #[value(name = "c")]
    C,
    /// A token whose signature does not verify: 401 signature_invalid (never cached).
    #[value(name = "d-badsig")]
    DBadsig,
    /// An expired token: 401 token_expired.
    #[value(name = "d-expired")]
    DExpired,
    /// Decide for a 25 000 wire transfer: the CEL escalation adds c2, so STEP_UP for c2.
    #[value(name = "e")]
    E,
    /// 100 000 distinct RS256 tokens (as b-rs256): fills the token cache for the memory target.
    #[value(name = "rss-100k")]
    Rss100k,
    /// HTTP GET through Envoy with scenario a's token: 200 from the upstream.
    #[value(name = "f")]
    F,
    /// GET /accounts/42 without a token: 401 token_missing once a rule matches (row g-glob-plain).
    #[value(name = "g-plain")]
    GPlain,
    /// GET of 1500 `/a` segments without a token, against bench/policies/glob-worst.yaml's
    /// `/**/a/**/a/**/z`: the path matcher's worst case, then 401 token_missing (row g-glob-worst).
    #[value(name = "g-worst")]
    GWorst,
    /// 100 000 distinct RS256 tokens with 8 KiB of claims each, against a policy whose CEL reads
    /// `claims` (every cached token keeps them): the cache's byte budget (row rss-8k-fill).
    #[value(name = "rss-8k")]
    Rss8k,
    /// GET /api/orders/42 without a token from [`RISK_SOURCES`] distinct source addresses, once
    /// each: 401 token_missing, a DENY a risk signal keyed by source counts (row rss-risk-1m).
    #[value(name = "risk-keys")]
    RiskKeys,
}

/// Distinct source addresses of scenario risk-keys.
pub const RISK_SOURCES: u32 = 1_000_000;

/// Scenario g-worst's path: `/a` 1500 times (3000 bytes).
pub static WORST_GLOB_PATH: LazyLock<String> = LazyLock::new(|| "/a".repeat(1500));

/// Bytes of the extra claim (`profile`) each token of scenario rss-8k carries.
pub const RSS_8K_CLAIM_BYTES: usize = 8192;

/// The answer a scenario must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allow,
    /// STEP_UP with the Entra claims challenge for `missing`.
    StepUp {
        missing: &'static str,
    },
    Deny {
        status: u32,
        reason: &'static str,
    },
}

/// Where a scenario's token(s) come from.
#[derive(Debug, Clone)]
pub enum TokenPlan {
    /// No credential at all: no `Authorization` header (Check), no token (Decide).
    None,
    /// No credential, from this many distinct source addresses (Check only).
    NoneFromSources(u32),
    /// One token, sent with every request.
    One {
        spec: TokenSpec,
        alg: Algorithm,
        tamper: bool,
    },
    /// Distinct tokens cycled (minted, or read from `--tokens`), each with an extra `profile`
    /// claim of `claim_bytes` characters when that is not 0 (`tokens::distinct_claims`).
    Distinct {
        spec: TokenSpec,
        alg: Algorithm,
        claim_bytes: usize,
    },
}

/// The request a scenario sends, before it is shaped for an RPC.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: &'static str,
    pub host: &'static str,
    pub path: &'static str,
    /// Decide only: the operation and the attributes.
    pub operation: Option<&'static str>,
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
    /// The client certificate's DER, passed on as Envoy or a `Decide` caller would.
    pub client_certificate: Option<&'static [u8]>,
}

/// Scenario a-bound's client certificate: 1200 bytes standing for a DER (a client certificate
/// is 1–2 KiB; stepgate hashes it and never parses it as X.509).
pub static BENCH_CERTIFICATE: LazyLock<Vec<u8>> =
    LazyLock::new(|| (0..1200u32).map(|i| (i * 7 + 3) as u8).collect());

/// `der` as Envoy sends a peer certificate: OpenSSL's PEM, every byte but the unreserved ones
/// percent-encoded.
pub fn envoy_certificate(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub const HOST: &str = "api.bench.stepgate.invalid";

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::A => "a",
            Scenario::ABound => "a-bound",
            Scenario::BRs256 => "b-rs256",
            Scenario::BEs256 => "b-es256",
            Scenario::C => "c",
            Scenario::DBadsig => "d-badsig",
            Scenario::DExpired => "d-expired",
            Scenario::E => "e",
            Scenario::Rss100k => "rss-100k",
            Scenario::F => "f",
            Scenario::GPlain => "g-plain",
            Scenario::GWorst => "g-worst",
            Scenario::Rss8k => "rss-8k",
            Scenario::RiskKeys => "risk-keys",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::A => "Check, ALLOW, same token (cached)",
            Scenario::ABound => "Check, ALLOW, same token bound to the client certificate",
            Scenario::BRs256 => "Check, ALLOW, distinct RS256 token per request",
            Scenario::BEs256 => "Check, ALLOW, distinct ES256 token per request",
            Scenario::C => "Check, STEP_UP with Entra claims challenge",
            Scenario::DBadsig => "Check, 401 bad signature",
            Scenario::DExpired => "Check, 401 expired token",
            Scenario::E => "Decide, CEL escalation (amount 25000) → STEP_UP c2",
            Scenario::Rss100k => "Check, 100 000 distinct RS256 tokens (cache fill)",
            Scenario::F => "HTTP GET through Envoy, same token as a, 200 expected",
            Scenario::GPlain => "Check GET /accounts/42, no token: 401 token_missing",
            Scenario::GWorst => {
                "Check GET /a × 1500 (glob worst case), no token: 401 token_missing"
            }
            Scenario::Rss8k => {
                "Check, 100 000 distinct RS256 tokens with 8 KiB of claims (cache fill)"
            }
            Scenario::RiskKeys => "Check without a token from 1 000 000 distinct sources",
        }
    }

    pub fn default_rpc(self) -> Rpc {
        match self {
            Scenario::E => Rpc::Decide,
            Scenario::F => Rpc::Http,
            _ => Rpc::Check,
        }
    }

    pub fn tokens(self) -> TokenPlan {
        let user = TokenSpec::default;
        let one = |spec: TokenSpec| TokenPlan::One {
            spec,
            alg: Algorithm::RS256,
            tamper: false,
        };
        match self {
            Scenario::A | Scenario::F => one(user()),
            Scenario::ABound => {
                use sha2::Digest as _;
                let thumbprint: [u8; 32] = sha2::Sha256::digest(&*BENCH_CERTIFICATE).into();
                let mut spec = user();
                spec.extra.insert(
                    "cnf".to_owned(),
                    serde_json::json!({
                        "x5t#S256": stepgate::identity::thumbprint::encode(&thumbprint)
                    }),
                );
                one(spec)
            }
            Scenario::BRs256 | Scenario::Rss100k => TokenPlan::Distinct {
                spec: user(),
                alg: Algorithm::RS256,
                claim_bytes: 0,
            },
            Scenario::BEs256 => TokenPlan::Distinct {
                spec: user(),
                alg: Algorithm::ES256,
                claim_bytes: 0,
            },
            Scenario::Rss8k => TokenPlan::Distinct {
                spec: user(),
                alg: Algorithm::RS256,
                claim_bytes: RSS_8K_CLAIM_BYTES,
            },
            Scenario::GPlain | Scenario::GWorst => TokenPlan::None,
            Scenario::RiskKeys => TokenPlan::NoneFromSources(RISK_SOURCES),
            // A password-only sign-in from a client that handles claims challenges.
            Scenario::C => one(TokenSpec {
                xms_cc: vec!["cp1".into()],
                ..user()
            }),
            Scenario::DBadsig => TokenPlan::One {
                spec: user(),
                alg: Algorithm::RS256,
                tamper: true,
            },
            // Expired an hour ago: far beyond the 60 s leeway.
            Scenario::DExpired => one(TokenSpec {
                lifetime: -3600,
                ..user()
            }),
            // MFA done (c1), but not the compliant device (c2) the large amount escalates to.
            Scenario::E => one(TokenSpec {
                acrs: vec!["c1".into()],
                xms_cc: vec!["cp1".into()],
                ..user()
            }),
        }
    }

    pub fn call(self) -> Call {
        let get = Call {
            method: "GET",
            host: HOST,
            path: "/api/orders/42?expand=items",
            operation: None,
            attributes: None,
            client_certificate: None,
        };
        match self {
            Scenario::ABound => Call {
                client_certificate: Some(BENCH_CERTIFICATE.as_slice()),
                ..get
            },
            Scenario::C => Call {
                method: "POST",
                path: "/payments/wire",
                ..get
            },
            Scenario::GPlain => Call {
                path: "/accounts/42",
                ..get
            },
            Scenario::GWorst => Call {
                path: WORST_GLOB_PATH.as_str(),
                ..get
            },
            Scenario::E => {
                let mut attributes = serde_json::Map::new();
                attributes.insert("amount".into(), serde_json::json!(25000));
                attributes.insert("currency".into(), serde_json::json!("EUR"));
                Call {
                    method: "POST",
                    path: "/payments/wire",
                    operation: Some("payments.wire_transfer"),
                    attributes: Some(attributes),
                    ..get
                }
            }
            _ => get,
        }
    }

    pub fn expect(self) -> Expect {
        match self {
            Scenario::A
            | Scenario::ABound
            | Scenario::BRs256
            | Scenario::BEs256
            | Scenario::Rss100k
            | Scenario::Rss8k
            | Scenario::F => Expect::Allow,
            Scenario::C => Expect::StepUp { missing: "c1" },
            Scenario::DBadsig => Expect::Deny {
                status: 401,
                reason: "signature_invalid",
            },
            Scenario::DExpired => Expect::Deny {
                status: 401,
                reason: "token_expired",
            },
            Scenario::E => Expect::StepUp { missing: "c2" },
            // No token: whatever rule matches (the catch-all here), only a token is asked for.
            Scenario::GPlain | Scenario::GWorst | Scenario::RiskKeys => Expect::Deny {
                status: 401,
                reason: "token_missing",
            },
        }
    }

    /// Whether the scenario can be sent over `rpc`.
    pub fn supports(self, rpc: Rpc) -> Result<(), String> {
        match (self, rpc) {
            (Scenario::E, Rpc::Decide) | (Scenario::F, Rpc::Http) => Ok(()),
            (Scenario::E, _) => {
                Err("scenario e needs --rpc decide: request attributes exist only in Decide".into())
            }
            (Scenario::F, _) => {
                Err("scenario f is HTTP through Envoy (--rpc http); use scenario a for gRPC".into())
            }
            // The Cerbos policy and the plain HTTP upstream model the ordinary ALLOW only.
            (_, Rpc::Cerbos | Rpc::Http) if self.expect() != Expect::Allow => Err(format!(
                "--rpc {} sends allowed requests only (scenarios a, b-*, rss-100k, f), not {}",
                rpc.as_str(),
                self.name()
            )),
            _ => Ok(()),
        }
    }
}

/// The encoded request for `token`; for HTTP, the `Authorization` header value.
pub fn encode(rpc: Rpc, call: &Call, token: &str) -> Bytes {
    match rpc {
        Rpc::Check => envoy_check(call, token).encode_to_vec().into(),
        Rpc::Decide => decide_request(call, token).encode_to_vec().into(),
        Rpc::Cerbos => cerbos::encode(call, token),
        Rpc::Http => format!("Bearer {token}").into(),
    }
}

/// The encoded request without any credential ([`TokenPlan::None`]): Check and Decide only (the
/// Cerbos request and the HTTP rows model an authenticated call).
pub fn encode_anonymous(rpc: Rpc, call: &Call) -> Result<Bytes, String> {
    match rpc {
        Rpc::Check => Ok(envoy_check_anonymous(call).encode_to_vec().into()),
        Rpc::Decide => {
            let mut request = decide_request(call, "");
            request.credential = None;
            Ok(request.encode_to_vec().into())
        }
        Rpc::Cerbos | Rpc::Http => Err(format!(
            "--rpc {} always sends a token; requests without one go over check or decide",
            rpc.as_str()
        )),
    }
}

/// Anonymous `Check`s of `call`, one from each of `count` distinct IPv4 sources in 10.0.0.0/8.
pub fn envoy_check_anonymous_from(call: &Call, count: u32) -> Vec<Bytes> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    let template = envoy_check_anonymous(call);
    (0..count)
        .map(|i| {
            let mut check = template.clone();
            let source = check
                .attributes
                .as_mut()
                .and_then(|a| a.source.as_mut())
                .and_then(|p| p.address.as_mut())
                .and_then(|a| a.address.as_mut());
            if let Some(address::Address::SocketAddress(socket)) = source {
                socket.address = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
                socket.port_specifier = Some(socket_address::PortSpecifier::PortValue(40_000));
            }
            check.encode_to_vec().into()
        })
        .collect()
}

/// A `CheckRequest` as Envoy sends it (see [`stepgate::demo::envoy_check_request`]).
pub fn envoy_check(call: &Call, token: &str) -> CheckRequest {
    let mut check = envoy_check_request(call.method, call.host, call.path, token);
    if let Some(der) = call.client_certificate
        && let Some(source) = check.attributes.as_mut().and_then(|a| a.source.as_mut())
    {
        source.certificate = envoy_certificate(der);
    }
    check
}

/// [`envoy_check`] for a request that carries no `Authorization` header at all.
pub fn envoy_check_anonymous(call: &Call) -> CheckRequest {
    let mut check = envoy_check(call, "");
    if let Some(http) = check
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.headers.remove("authorization");
    }
    check
}

/// A `DecideRequest`: the token, and the operation with attributes or the HTTP request.
pub fn decide_request(call: &Call, token: &str) -> DecideRequest {
    DecideRequest {
        credential: Some(decide_request::Credential::Token(token.to_owned())),
        operation: call.operation.unwrap_or_default().to_owned(),
        http: call.operation.is_none().then(|| HttpRequest {
            method: call.method.into(),
            host: call.host.into(),
            path: call.path.into(),
            headers: HashMap::new(),
        }),
        attributes: call.attributes.as_ref().map(stepgate::api::json_to_struct),
        client_certificate: call
            .client_certificate
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
        explain: false,
    }
}

/// gRPC codes Envoy's ext_authz maps denials from (google.rpc.Code).
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const PERMISSION_DENIED: i32 = 7;
const UNAUTHENTICATED: i32 = 16;

/// Checks an encoded gRPC response of `rpc` against `expect` (HTTP answers are checked by their
/// status in `http::check_status`).
pub fn validate(rpc: Rpc, expect: Expect, body: &[u8]) -> Result<(), String> {
    match rpc {
        Rpc::Cerbos => cerbos::validate(expect, body),
        Rpc::Http => Err("an HTTP answer is checked by its status, not as a gRPC body".into()),
        Rpc::Check => {
            let response = CheckResponse::decode(body)
                .map_err(|e| format!("undecodable CheckResponse: {e}"))?;
            validate_check(expect, &response)
        }
        Rpc::Decide => {
            let response = DecideResponse::decode(body)
                .map_err(|e| format!("undecodable DecideResponse: {e}"))?;
            validate_decide(expect, &response)
        }
    }
}

pub fn validate_check(expect: Expect, response: &CheckResponse) -> Result<(), String> {
    let (code, message) = response
        .status
        .as_ref()
        .map_or((OK, ""), |s| (s.code, s.message.as_str()));
    let got = || format!("code {code} ({message})");
    match expect {
        Expect::Allow => match (&response.http_response, code) {
            (Some(HttpResponse::OkResponse(_)), OK) => Ok(()),
            _ => Err(format!("expected OK, got {}", got())),
        },
        Expect::StepUp { .. } | Expect::Deny { .. } => {
            let Some(HttpResponse::DeniedResponse(denied)) = &response.http_response else {
                return Err(format!("expected a denied response, got {}", got()));
            };
            let status = denied.status.as_ref().map_or(0, |s| s.code);
            let www = denied
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key.eq_ignore_ascii_case("www-authenticate"))
                .map(|h| h.value.as_str());
            match expect {
                Expect::StepUp { .. } => {
                    if code != UNAUTHENTICATED || status != 401 {
                        return Err(format!(
                            "expected 401 STEP_UP, got HTTP {status}, {}",
                            got()
                        ));
                    }
                    if message != "missing_auth_context" {
                        return Err(format!("expected missing_auth_context, got {message}"));
                    }
                    match www {
                        Some(w)
                            if w.contains("error=\"insufficient_claims\"")
                                && w.contains("claims=\"") =>
                        {
                            Ok(())
                        }
                        other => Err(format!("expected an Entra claims challenge, got {other:?}")),
                    }
                }
                Expect::Deny {
                    status: want,
                    reason,
                } => {
                    let want_code = match want {
                        400 => INVALID_ARGUMENT,
                        401 => UNAUTHENTICATED,
                        _ => PERMISSION_DENIED,
                    };
                    if code != want_code || status as u32 != want || message != reason {
                        return Err(format!(
                            "expected HTTP {want} {reason}, got HTTP {status}, {}",
                            got()
                        ));
                    }
                    if want == 401 && www.is_none() {
                        return Err("a 401 without WWW-Authenticate".into());
                    }
                    Ok(())
                }
                Expect::Allow => unreachable!(),
            }
        }
    }
}

pub fn validate_decide(expect: Expect, response: &DecideResponse) -> Result<(), String> {
    let outcome = response.outcome();
    let got = || {
        format!(
            "{} {} ({})",
            outcome.as_str_name(),
            response.http_status,
            response.reason
        )
    };
    match expect {
        Expect::Allow if outcome == Outcome::Allow && response.http_status == 200 => Ok(()),
        Expect::StepUp { missing } => {
            if outcome != Outcome::StepUp || response.http_status != 401 {
                return Err(format!("expected STEP_UP 401, got {}", got()));
            }
            if !response
                .www_authenticate
                .contains("error=\"insufficient_claims\"")
            {
                return Err(format!(
                    "expected an Entra claims challenge, got {:?}",
                    response.www_authenticate
                ));
            }
            let missing_ok = response
                .step_up
                .as_ref()
                .is_some_and(|s| s.missing_auth_contexts == [missing]);
            if missing_ok {
                Ok(())
            } else {
                Err(format!(
                    "expected missing auth context {missing}, got {:?}",
                    response.step_up.as_ref().map(|s| &s.missing_auth_contexts)
                ))
            }
        }
        Expect::Deny { status, reason }
            if outcome == Outcome::Deny
                && response.http_status == status
                && response.reason == reason =>
        {
            Ok(())
        }
        _ => Err(format!("expected {expect:?}, got {}", got())),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::{
        ext_authz::v3::pb::{
            DeniedHttpResponse, HeaderValue, HeaderValueOption, HttpStatus, OkHttpResponse,
        },
        pb::google::rpc,
    };
    use stepgate::api::v1::StepUpRequirement;

    use super::*;

    fn denied(code: i32, message: &str, status: i32, www: Option<&str>) -> CheckResponse {
        CheckResponse {
            status: Some(rpc::Status {
                code,
                message: message.into(),
                details: vec![],
            }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: status }),
                headers: www
                    .map(|w| HeaderValueOption {
                        header: Some(HeaderValue {
                            key: "www-authenticate".into(),
                            value: w.into(),
                            raw_value: vec![],
                        }),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                body: String::new(),
            })),
        }
    }

    const ENTRA: &str = "Bearer realm=\"\", authorization_uri=\"x\", error=\"insufficient_claims\", claims=\"eyJ9\"";

    #[test]
    fn check_answers_are_validated() {
        let ok = CheckResponse {
            status: Some(rpc::Status::default()),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
        };
        assert_eq!(validate_check(Expect::Allow, &ok), Ok(()));
        assert!(validate_check(Expect::StepUp { missing: "c1" }, &ok).is_err());

        let step_up = denied(16, "missing_auth_context", 401, Some(ENTRA));
        assert_eq!(
            validate_check(Expect::StepUp { missing: "c1" }, &step_up),
            Ok(())
        );
        assert!(validate_check(Expect::Allow, &step_up).is_err());
        let rfc9470 = denied(
            16,
            "missing_auth_context",
            401,
            Some("Bearer error=\"insufficient_user_authentication\""),
        );
        assert!(validate_check(Expect::StepUp { missing: "c1" }, &rfc9470).is_err());

        let bad_sig = Expect::Deny {
            status: 401,
            reason: "signature_invalid",
        };
        let www = "Bearer realm=\"r\", error=\"invalid_token\"";
        assert_eq!(
            validate_check(bad_sig, &denied(16, "signature_invalid", 401, Some(www))),
            Ok(())
        );
        assert!(validate_check(bad_sig, &denied(16, "token_expired", 401, Some(www))).is_err());
        assert!(validate_check(bad_sig, &denied(16, "signature_invalid", 401, None)).is_err());
        assert!(validate_check(bad_sig, &denied(7, "signature_invalid", 403, Some(www))).is_err());
    }

    #[test]
    fn decide_answers_are_validated() {
        let step_up = DecideResponse {
            outcome: Outcome::StepUp as i32,
            http_status: 401,
            reason: "missing_auth_context".into(),
            www_authenticate: ENTRA.into(),
            step_up: Some(StepUpRequirement {
                missing_auth_contexts: vec!["c2".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            validate_decide(Expect::StepUp { missing: "c2" }, &step_up),
            Ok(())
        );
        // Without the escalation the missing context would be c1.
        assert!(validate_decide(Expect::StepUp { missing: "c1" }, &step_up).is_err());
        assert!(validate_decide(Expect::Allow, &step_up).is_err());
        let allow = DecideResponse {
            outcome: Outcome::Allow as i32,
            http_status: 200,
            ..Default::default()
        };
        assert_eq!(validate_decide(Expect::Allow, &allow), Ok(()));
        let deny = DecideResponse {
            outcome: Outcome::Deny as i32,
            http_status: 401,
            reason: "token_expired".into(),
            ..Default::default()
        };
        let expired = Expect::Deny {
            status: 401,
            reason: "token_expired",
        };
        assert_eq!(validate_decide(expired, &deny), Ok(()));
        assert!(validate_decide(Expect::Allow, &deny).is_err());
    }

    #[test]
    fn requests_are_shaped_per_rpc() {
        let check = envoy_check(&Scenario::C.call(), "tok");
        let http = check.attributes.unwrap().request.unwrap().http.unwrap();
        assert_eq!(http.method, "POST");
        assert_eq!(http.path, "/payments/wire");
        assert_eq!(http.headers["authorization"], "Bearer tok");
        assert_eq!(http.headers[":path"], "/payments/wire");

        let decide = decide_request(&Scenario::E.call(), "tok");
        assert_eq!(decide.operation, "payments.wire_transfer");
        assert!(decide.http.is_none());
        let amount = &decide.attributes.unwrap().fields["amount"];
        assert_eq!(
            amount.kind,
            Some(prost_types::value::Kind::NumberValue(25000.0))
        );

        let decide_a = decide_request(&Scenario::A.call(), "tok");
        assert_eq!(decide_a.http.unwrap().path, "/api/orders/42?expand=items");
        assert!(Scenario::E.supports(Rpc::Check).is_err());
        assert!(Scenario::A.supports(Rpc::Decide).is_ok());
        assert!(!encode(Rpc::Check, &Scenario::A.call(), "t").is_empty());
        assert_eq!(
            &encode(Rpc::Http, &Scenario::F.call(), "t")[..],
            b"Bearer t"
        );
    }

    /// Scenario a-bound's Check carries, as Envoy spells it, the certificate its token is bound
    /// to, read as stepgate reads it; its Decide carries the same certificate's DER.
    #[test]
    fn the_bound_scenario_sends_the_certificate_its_token_is_bound_to() {
        use sha2::Digest as _;
        use stepgate::identity::{ClientCertificate, thumbprint};
        let call = Scenario::ABound.call();
        let check = envoy_check(&call, "tok");
        let sent = check.attributes.unwrap().source.unwrap().certificate;
        let read = ClientCertificate::UrlEncodedPem(sent.into())
            .thumbprint()
            .expect("one PEM certificate as Envoy writes it");
        let TokenPlan::One { spec, .. } = Scenario::ABound.tokens() else {
            panic!("one token");
        };
        assert_eq!(spec.extra["cnf"]["x5t#S256"], thumbprint::encode(&read));
        let decide = decide_request(&call, "tok");
        let der: [u8; 32] = sha2::Sha256::digest(&decide.client_certificate).into();
        assert_eq!(der, read);
        assert_eq!(Scenario::ABound.expect(), Expect::Allow);
        let plain = envoy_check(&Scenario::A.call(), "tok");
        assert!(
            plain
                .attributes
                .unwrap()
                .source
                .unwrap()
                .certificate
                .is_empty()
        );
    }

    #[test]
    fn glob_rows_send_no_token_and_expect_token_missing() {
        for scenario in [Scenario::GPlain, Scenario::GWorst] {
            assert!(matches!(scenario.tokens(), TokenPlan::None));
            let check =
                CheckRequest::decode(&encode_anonymous(Rpc::Check, &scenario.call()).unwrap()[..])
                    .unwrap();
            let http = check.attributes.unwrap().request.unwrap().http.unwrap();
            assert_eq!(http.method, "GET");
            assert!(!http.headers.contains_key("authorization"), "{scenario:?}");
            assert_eq!(http.headers[":path"], http.path);
            let decide = DecideRequest::decode(
                &encode_anonymous(Rpc::Decide, &scenario.call()).unwrap()[..],
            )
            .unwrap();
            assert_eq!(decide.credential, None);
            assert!(encode_anonymous(Rpc::Cerbos, &scenario.call()).is_err());
            assert!(scenario.supports(Rpc::Cerbos).is_err());
            assert!(scenario.supports(Rpc::Http).is_err());
        }
        assert_eq!(Scenario::GPlain.call().path, "/accounts/42");
        let worst = Scenario::GWorst.call().path;
        assert_eq!(worst.len(), 3000);
        assert_eq!(worst.split('/').filter(|s| *s == "a").count(), 1500);
        assert!(
            !worst.ends_with("/z"),
            "the glob /**/a/**/a/**/z must not match"
        );

        let missing = Scenario::GWorst.expect();
        let www = "Bearer realm=\"stepgate-demo\"";
        assert_eq!(
            validate_check(missing, &denied(16, "token_missing", 401, Some(www))),
            Ok(())
        );
        // Another denial (the glob rule's own answer would still be token_missing; a 403 or
        // another reason is a wrong policy or server).
        assert!(validate_check(missing, &denied(7, "no_matching_rule", 403, None)).is_err());
        assert!(validate_check(missing, &denied(16, "token_malformed", 401, Some(www))).is_err());
    }

    #[test]
    fn the_8k_scenario_mints_fat_distinct_tokens() {
        let TokenPlan::Distinct {
            alg, claim_bytes, ..
        } = Scenario::Rss8k.tokens()
        else {
            panic!("rss-8k sends distinct tokens");
        };
        assert_eq!((alg, claim_bytes), (Algorithm::RS256, 8192));
        assert_eq!(Scenario::Rss8k.expect(), Expect::Allow);
        assert!(matches!(
            Scenario::Rss100k.tokens(),
            TokenPlan::Distinct { claim_bytes: 0, .. }
        ));
    }

    #[test]
    fn peers_and_http_take_allowed_scenarios_only() {
        for ok in [Scenario::A, Scenario::BRs256, Scenario::BEs256] {
            assert_eq!(ok.supports(Rpc::Cerbos), Ok(()));
            assert_eq!(ok.supports(Rpc::Http), Ok(()));
        }
        assert_eq!(Scenario::F.default_rpc(), Rpc::Http);
        assert_eq!(Scenario::F.supports(Rpc::Http), Ok(()));
        assert!(Scenario::F.supports(Rpc::Check).is_err());
        assert!(Scenario::C.supports(Rpc::Cerbos).is_err());
        assert!(Scenario::DBadsig.supports(Rpc::Http).is_err());
        assert!(Scenario::E.supports(Rpc::Cerbos).is_err());
        assert_eq!(Rpc::Http.grpc_path(), None);
        assert_eq!(
            Rpc::Cerbos.grpc_path(),
            Some("/cerbos.svc.v1.CerbosService/CheckResources")
        );
    }
}
