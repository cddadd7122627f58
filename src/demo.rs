//! Demo tokens: minting signed JWTs with the demo keys under `examples/demo-keys/`, for
//! `stepgate token`, the README's walkthrough and the tests; and an Envoy-shaped `CheckRequest`
//! for the benchmarks. Nothing in the serving path uses this.

use std::collections::HashMap;

use envoy_types::{
    ext_authz::v3::pb::CheckRequest,
    pb::envoy::{
        config::core::v3::{
            Address, SocketAddress, address::Address as AddressKind, socket_address::PortSpecifier,
        },
        service::auth::v3::{
            AttributeContext,
            attribute_context::{HttpRequest as EnvoyHttpRequest, Peer, Request as EnvoyRequest},
        },
    },
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

/// Issuer and audience of the bundled demo policy (`examples/stepgate.yaml`).
pub const DEMO_ENTRA_ISSUER: &str = "https://login.demo.stepgate.invalid/entra/v2.0";
pub const DEMO_OIDC_ISSUER: &str = "https://login.demo.stepgate.invalid/oidc";
pub const DEMO_AUDIENCE: &str = "api://stepgate-demo";
pub const DEMO_RSA_KID: &str = "stepgate-demo-rsa-1";
pub const DEMO_EC_KID: &str = "stepgate-demo-ec-1";

/// The claims of a token to mint. `Default` gives an Entra-style user token issued now.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub issuer: String,
    pub audience: String,
    pub subject: String,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub acrs: Vec<String>,
    pub acr: Option<String>,
    pub amr: Vec<String>,
    /// Seconds before `now` at which the user signed in; `None` leaves `auth_time` out.
    pub auth_age: Option<i64>,
    pub xms_cc: Vec<String>,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    /// Seconds the token lives from `now` (negative mints an expired token).
    pub lifetime: i64,
    pub extra: Map<String, Value>,
}

impl Default for TokenSpec {
    fn default() -> Self {
        Self {
            issuer: DEMO_ENTRA_ISSUER.to_owned(),
            audience: DEMO_AUDIENCE.to_owned(),
            subject: "alice".to_owned(),
            tenant: Some("72f988bf-86f1-41af-91ab-2d7cd011db47".to_owned()),
            client_id: Some("demo-client".to_owned()),
            acrs: Vec::new(),
            acr: None,
            amr: vec!["pwd".to_owned()],
            auth_age: Some(0),
            xms_cc: Vec::new(),
            scopes: vec!["user_impersonation".to_owned()],
            roles: Vec::new(),
            lifetime: 3600,
            extra: Map::new(),
        }
    }
}

impl TokenSpec {
    /// The claims set at unix time `now`.
    pub fn claims(&self, now: i64) -> Value {
        let mut claims = json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": self.subject,
            "iat": now,
            "nbf": now,
            "exp": now + self.lifetime,
        });
        let map = claims.as_object_mut().expect("a JSON object literal");
        let mut put = |k: &str, v: Value| {
            map.insert(k.to_owned(), v);
        };
        if let Some(t) = &self.tenant {
            put("tid", json!(t));
        }
        if let Some(c) = &self.client_id {
            put("azp", json!(c));
        }
        if !self.acrs.is_empty() {
            put("acrs", json!(self.acrs));
        }
        if let Some(a) = &self.acr {
            put("acr", json!(a));
        }
        if !self.amr.is_empty() {
            put("amr", json!(self.amr));
        }
        if let Some(age) = self.auth_age {
            put("auth_time", json!(now - age));
        }
        if !self.xms_cc.is_empty() {
            put("xms_cc", json!(self.xms_cc));
        }
        if !self.scopes.is_empty() {
            put("scp", json!(self.scopes.join(" ")));
        }
        if !self.roles.is_empty() {
            put("roles", json!(self.roles));
        }
        for (k, v) in &self.extra {
            map.insert(k.clone(), v.clone());
        }
        claims
    }
}

/// Signs `claims` with a PEM private key (RSA or EC, PKCS#8) under `kid`.
pub fn sign(claims: &Value, key_pem: &[u8], alg: Algorithm, kid: &str) -> Result<String, String> {
    let key = match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(key_pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(key_pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(key_pem),
        _ => return Err(format!("{alg:?} is not an asymmetric algorithm")),
    }
    .map_err(|e| format!("cannot read the private key: {e}"))?;
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| format!("cannot sign: {e}"))
}

/// A `CheckRequest` as Envoy sends it (`encode_raw_headers: false`): lower-case header keys with
/// the pseudo-headers, the usual proxy headers, the bearer token, source and destination peers.
/// The benchmark's load generator and micro-benchmarks send this.
pub fn envoy_check_request(method: &str, host: &str, path: &str, token: &str) -> CheckRequest {
    let mut headers: HashMap<String, String> = HashMap::new();
    let mut put = |k: &str, v: &str| {
        headers.insert(k.to_owned(), v.to_owned());
    };
    put(":authority", host);
    put(":method", method);
    put(":path", path);
    put(":scheme", "https");
    put("authorization", &format!("Bearer {token}"));
    put("accept", "application/json");
    put("user-agent", "bench-client/1.0");
    put("x-forwarded-proto", "https");
    put("x-request-id", "3c1c5b1e-9d2f-4b8a-8000-000000000042");
    if method == "POST" {
        put("content-type", "application/json");
        put("content-length", "64");
    }
    let peer = |ip: &str, port: u32| Peer {
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: ip.to_owned(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer("10.1.2.3", 51234)),
            destination: Some(peer("10.1.0.10", 8443)),
            request: Some(EnvoyRequest {
                time: None,
                http: Some(EnvoyHttpRequest {
                    id: "9114224365146203311".into(),
                    method: method.into(),
                    headers,
                    path: path.into(),
                    host: host.into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}
