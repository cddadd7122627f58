//! CEL conditions, parsed once when the policy is compiled and evaluated against a request.
//!
//! Variables: `request` (`operation`, `method`, `host`, `path`, `query`, `headers`, `attributes`,
//! `context`), `claims` (the verified token's claims; empty without a token) and `now` (unix seconds).

use std::{cell::OnceCell, sync::Arc};

use cel::{Context, Env, Program, Value};
use serde_json::{Map, Value as Json};

use crate::request::AccessRequest;

/// A compiled CEL expression and its source (for messages and `stepgate check`).
pub struct Condition {
    pub source: String,
    program: Program,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Condition({:?})", self.source)
    }
}

const VARIABLES: [&str; 3] = ["request", "claims", "now"];

impl Condition {
    /// Parses `source`. A syntax error, or a condition that references none of the variables, is
    /// refused with a user-facing message.
    pub fn compile(env: &Env, source: &str) -> Result<Self, String> {
        let program = env
            .compile(source)
            .map_err(|e| format!("invalid CEL expression {source:?}: {e}"))?;
        Ok(Self {
            source: source.to_owned(),
            program,
        })
    }

    /// Evaluates to a boolean. Any error, or a non-boolean result, is an `Err` with a message; the
    /// caller decides what failing closed means at its place.
    pub fn evaluate(&self, input: &CelInput<'_>) -> Result<bool, String> {
        let ctx = input.context();
        match self.program.execute(ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "{:?} evaluated to {:?}, not a boolean",
                self.source,
                other.type_of()
            )),
            Err(e) => Err(format!("{:?} could not be evaluated: {e}", self.source)),
        }
    }
}

/// The shared CEL environment (standard library), built once per policy.
pub fn environment() -> Arc<Env> {
    Arc::new(Env::stdlib())
}

/// The variables of one evaluation, converted to CEL values at most once, on first use.
pub struct CelInput<'a> {
    env: &'a Arc<Env>,
    request: &'a AccessRequest,
    normalized_path: Option<&'a str>,
    claims: Option<&'a Map<String, Json>>,
    now: i64,
    context: OnceCell<Context<'static, 'static>>,
}

impl<'a> CelInput<'a> {
    pub fn new(
        env: &'a Arc<Env>,
        request: &'a AccessRequest,
        normalized_path: Option<&'a str>,
        claims: Option<&'a Map<String, Json>>,
        now: i64,
    ) -> Self {
        Self {
            env,
            request,
            normalized_path,
            claims,
            now,
            context: OnceCell::new(),
        }
    }

    fn context(&self) -> &Context<'static, 'static> {
        self.context.get_or_init(|| {
            let mut ctx = Context::with_env(Arc::clone(self.env));
            let to_cel = |json: Json| cel::to_value(json).unwrap_or(Value::Null);
            let mut request = Map::new();
            let r = self.request;
            request.insert(
                "operation".into(),
                r.operation.clone().unwrap_or_default().into(),
            );
            let http = r.http.as_ref();
            request.insert(
                "method".into(),
                http.map(|h| h.method.clone()).unwrap_or_default().into(),
            );
            request.insert(
                "host".into(),
                http.map(|h| h.host.clone()).unwrap_or_default().into(),
            );
            request.insert(
                "path".into(),
                self.normalized_path.unwrap_or_default().into(),
            );
            let query = http
                .and_then(|h| h.target.split_once('?').map(|(_, q)| q.to_owned()))
                .unwrap_or_default();
            request.insert("query".into(), query.into());
            let headers: Map<String, Json> = http
                .map(|h| {
                    h.headers
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::from(v.as_str())))
                        .collect()
                })
                .unwrap_or_default();
            request.insert("headers".into(), Json::Object(headers));
            request.insert("attributes".into(), Json::Object(r.attributes.clone()));
            request.insert("context".into(), Json::Object(r.context.clone()));
            let source = r.source.clone().unwrap_or_default();
            request.insert(
                "source".into(),
                serde_json::json!({"address": source.address, "principal": source.principal}),
            );
            ctx.add_variable_from_value(VARIABLES[0], to_cel(Json::Object(request)));
            let claims = self.claims.cloned().unwrap_or_default();
            ctx.add_variable_from_value(VARIABLES[1], to_cel(Json::Object(claims)));
            ctx.add_variable_from_value(VARIABLES[2], Value::Int(self.now));
            ctx
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(source: &str, attributes: Json, claims: Json) -> Result<bool, String> {
        let env = environment();
        let condition = Condition::compile(&env, source)?;
        let request = AccessRequest {
            operation: Some("payments.wire_transfer".into()),
            attributes: attributes.as_object().unwrap().clone(),
            ..Default::default()
        };
        let claims = claims.as_object().unwrap().clone();
        let input = CelInput::new(&env, &request, None, Some(&claims), 1_700_000_000);
        condition.evaluate(&input)
    }

    #[test]
    fn compares_attribute_numbers_of_either_kind() {
        assert_eq!(
            eval(
                "request.attributes.amount > 10000",
                json!({"amount": 25000.0}),
                json!({})
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                "request.attributes.amount > 10000",
                json!({"amount": 500}),
                json!({})
            ),
            Ok(false)
        );
    }

    #[test]
    fn reads_claims_and_operation() {
        let claims = json!({"amr": ["pwd", "mfa"], "tid": "t1"});
        assert_eq!(
            eval(
                "'mfa' in claims.amr && claims.tid == 't1'",
                json!({}),
                claims.clone()
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                "request.operation.startsWith('payments.')",
                json!({}),
                claims
            ),
            Ok(true)
        );
    }

    #[test]
    fn missing_attribute_is_an_error_and_has_guards_it() {
        assert!(eval("request.attributes.amount > 1", json!({}), json!({})).is_err());
        assert_eq!(
            eval(
                "has(request.attributes.amount) && request.attributes.amount > 1",
                json!({}),
                json!({})
            ),
            Ok(false)
        );
    }

    #[test]
    fn source_peer_is_visible_and_empty_without_one() {
        assert_eq!(
            eval("request.source.principal == ''", json!({}), json!({})),
            Ok(true)
        );
        let env = environment();
        let condition = Condition::compile(
            &env,
            "request.source.principal.startsWith('spiffe://cluster.local/ns/payments/')",
        )
        .unwrap();
        let request = AccessRequest {
            source: Some(crate::request::Peer {
                address: "10.0.0.7".into(),
                principal: "spiffe://cluster.local/ns/payments/sa/api".into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            condition.evaluate(&CelInput::new(&env, &request, None, None, 0)),
            Ok(true)
        );
    }

    #[test]
    fn non_boolean_result_and_syntax_errors_are_errors() {
        assert!(
            eval("1 + 1", json!({}), json!({}))
                .unwrap_err()
                .contains("not a boolean")
        );
        assert!(
            eval("request.(", json!({}), json!({}))
                .unwrap_err()
                .contains("invalid CEL")
        );
    }
}
