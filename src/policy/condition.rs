//! CEL conditions, parsed once when the policy is compiled and evaluated against a request.
//!
//! Variables: `request` (`operation`, `method`, `host`, `path`, `query`, `headers`, `attributes`,
//! `context`), `claims` (the verified token's claims; empty without a token), `now` (unix seconds)
//! and `risk` (the request's count of each risk signal, by name).

use std::{cell::OnceCell, sync::Arc};

use cel::{Context, Env, Program, Value};
use serde_json::{Map, Value as Json};

use crate::request::AccessRequest;

/// A compiled CEL expression and its source (for messages and `stepgate check`).
pub struct Condition {
    pub source: String,
    program: Program,
    uses: Uses,
}

/// Which variables (and whether `request.headers`) an expression reads: only those are converted
/// to CEL values for it, since converting all claims and headers costs far more than evaluating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Uses {
    request: bool,
    /// Decided from the source text: a field can only be read by naming it. An expression that
    /// builds the name at run time sees no headers, and fails closed.
    headers: bool,
    claims: bool,
    now: bool,
    risk: bool,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Condition({:?})", self.source)
    }
}

/// Deepest nesting of brackets in a condition. cel-rust's parser recurses per level with large
/// frames (several KiB each in a release build) and accepts about 96; real conditions use a
/// handful, and a limit well below keeps parsing and evaluating within any thread's stack.
pub const MAX_NESTING: usize = 32;

impl Condition {
    /// Parses `source`. A syntax error, or nesting deeper than [`MAX_NESTING`], is refused with a
    /// user-facing message.
    pub fn compile(env: &Env, source: &str) -> Result<Self, String> {
        let depth = nesting(source);
        if depth > MAX_NESTING {
            return Err(format!(
                "the CEL expression is nested {depth} levels deep, more than {MAX_NESTING}: \
                 split it into simpler conditions"
            ));
        }
        let program = env
            .compile(source)
            .map_err(|e| format!("invalid CEL expression {source:?}: {e}"))?;
        let references = program.references();
        let uses = Uses {
            request: references.has_variable("request"),
            headers: source.contains("headers"),
            claims: references.has_variable("claims"),
            now: references.has_variable("now"),
            risk: references.has_variable("risk"),
        };
        Ok(Self {
            source: source.to_owned(),
            program,
            uses,
        })
    }

    /// The names the expression reads as `risk.<name>` or `risk['<name>']`, found in CEL's own
    /// syntax tree (a name built at run time is not: it fails closed when evaluated).
    pub fn risk_reads(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.uses.risk {
            collect_risk_reads(self.program.expression(), &mut names);
        }
        names
    }

    /// Whether the expression reads the `claims` variable.
    pub fn reads_claims(&self) -> bool {
        self.uses.claims
    }

    /// Evaluates to a boolean. Any error, or a non-boolean result, is an `Err` with a message; the
    /// caller decides what failing closed means at its place.
    pub fn evaluate(&self, input: &CelInput<'_>) -> Result<bool, String> {
        let mut ctx = Context::with_env(Arc::clone(input.env));
        if self.uses.request {
            ctx.add_variable_from_value("request", input.request(self.uses.headers));
        }
        if self.uses.claims {
            ctx.add_variable_from_value("claims", input.claims());
        }
        if self.uses.now {
            ctx.add_variable_from_value("now", Value::Int(input.now));
        }
        if self.uses.risk {
            ctx.add_variable_from_value("risk", input.risk());
        }
        match self.program.execute(&ctx) {
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

/// The variables of one evaluation, each converted to a CEL value at most once, on first use
/// (CEL values share their contents, so handing one to several evaluations is cheap).
pub struct CelInput<'a> {
    env: &'a Arc<Env>,
    request: &'a AccessRequest,
    normalized_path: Option<&'a str>,
    claims: Option<&'a Map<String, Json>>,
    now: i64,
    request_value: OnceCell<Value>,
    request_with_headers: OnceCell<Value>,
    claims_value: OnceCell<Value>,
    /// The risk signals' counts for this request, by name (read only by expressions that use them).
    risk_counts: Option<&'a dyn Fn() -> Map<String, Json>>,
    risk_value: OnceCell<Value>,
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
            request_value: OnceCell::new(),
            request_with_headers: OnceCell::new(),
            claims_value: OnceCell::new(),
            risk_counts: None,
            risk_value: OnceCell::new(),
        }
    }

    /// Where `risk` comes from: called at most once, by the first expression that reads it.
    pub fn with_risk(mut self, counts: &'a dyn Fn() -> Map<String, Json>) -> Self {
        self.risk_counts = Some(counts);
        self
    }

    fn risk(&self) -> Value {
        self.risk_value
            .get_or_init(|| {
                to_cel(Json::Object(
                    self.risk_counts.map(|f| f()).unwrap_or_default(),
                ))
            })
            .clone()
    }

    fn claims(&self) -> Value {
        self.claims_value
            .get_or_init(|| to_cel(Json::Object(self.claims.cloned().unwrap_or_default())))
            .clone()
    }

    fn request(&self, with_headers: bool) -> Value {
        let cell = if with_headers {
            &self.request_with_headers
        } else {
            &self.request_value
        };
        cell.get_or_init(|| to_cel(Json::Object(self.request_map(with_headers))))
            .clone()
    }

    fn request_map(&self, with_headers: bool) -> Map<String, Json> {
        let r = self.request;
        let http = r.http.as_ref();
        let text = |value: Option<&str>| Json::from(value.unwrap_or_default());
        let mut request = Map::new();
        request.insert("operation".into(), text(r.operation.as_deref()));
        request.insert("method".into(), text(http.map(|h| h.method.as_str())));
        request.insert("host".into(), text(http.map(|h| h.host.as_str())));
        request.insert("path".into(), text(self.normalized_path));
        let query = http.and_then(|h| h.target.split_once('?').map(|(_, q)| q));
        request.insert("query".into(), text(query));
        let headers: Map<String, Json> = match http {
            Some(h) if with_headers => h
                .headers
                .iter()
                .map(|(k, v)| (k.to_owned(), Json::from(v)))
                .collect(),
            _ => Map::new(),
        };
        request.insert("headers".into(), Json::Object(headers));
        request.insert("attributes".into(), Json::Object(r.attributes.clone()));
        request.insert("context".into(), Json::Object(r.context.clone()));
        let source = r.source.clone().unwrap_or_default();
        request.insert(
            "source".into(),
            serde_json::json!({"address": source.address, "principal": source.principal}),
        );
        request
    }
}

fn to_cel(json: Json) -> Value {
    cel::to_value(json).unwrap_or(Value::Null)
}

fn collect_risk_reads(e: &cel::IdedExpr, out: &mut Vec<String>) {
    use cel::common::ast::{EntryExpr, Expr, LiteralValue, operators};
    let is_risk = |e: &cel::IdedExpr| matches!(&e.expr, Expr::Ident(name) if name == "risk");
    match &e.expr {
        Expr::Select(select) => {
            if is_risk(&select.operand) {
                out.push(select.field.clone());
            }
            collect_risk_reads(&select.operand, out);
        }
        Expr::Call(call) => {
            if call.func_name == operators::INDEX
                && let [map, key] = call.args.as_slice()
                && is_risk(map)
                && let Expr::Literal(LiteralValue::String(name)) = &key.expr
            {
                out.push(name.inner().to_owned());
            }
            for e in call.target.iter().map(|t| &**t).chain(&call.args) {
                collect_risk_reads(e, out);
            }
        }
        Expr::Comprehension(c) => {
            for e in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                collect_risk_reads(e, out);
            }
        }
        Expr::List(list) => list
            .elements
            .iter()
            .for_each(|e| collect_risk_reads(e, out)),
        Expr::Map(cel::common::ast::MapExpr { entries })
        | Expr::Struct(cel::common::ast::StructExpr { entries, .. }) => {
            for entry in entries {
                match &entry.expr {
                    EntryExpr::MapEntry(m) => {
                        collect_risk_reads(&m.key, out);
                        collect_risk_reads(&m.value, out);
                    }
                    EntryExpr::StructField(f) => collect_risk_reads(&f.value, out),
                }
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// The deepest nesting of `(`, `[` and `{` in a CEL source, outside string literals.
fn nesting(source: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut chars = source.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '(' | '[' | '{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (None, ')' | ']' | '}') => depth = depth.saturating_sub(1),
            (None, _) => {}
        }
    }
    deepest
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
    fn headers_and_claims_are_converted_only_for_expressions_that_read_them() {
        let env = environment();
        let mut headers = crate::request::Headers::default();
        headers.insert("x-device".to_owned(), "managed".to_owned());
        let request = AccessRequest {
            http: Some(crate::request::HttpAttributes::new(
                "GET", "h", "/a", headers,
            )),
            ..Default::default()
        };
        let claims = json!({"tid": "t1"}).as_object().unwrap().clone();
        let input = CelInput::new(&env, &request, Some("/a"), Some(&claims), 5);
        let reads = |src: &str| Condition::compile(&env, src).unwrap().evaluate(&input);
        assert_eq!(reads("request.path == '/a'"), Ok(true));
        assert!(input.request_with_headers.get().is_none() && input.claims_value.get().is_none());
        assert_eq!(reads("request.headers['x-device'] == 'managed'"), Ok(true));
        assert_eq!(reads("claims.tid == 't1' && now == 5"), Ok(true));
        assert!(input.request_with_headers.get().is_some() && input.claims_value.get().is_some());
    }

    #[test]
    fn nesting_past_the_limit_is_refused_before_parsing() {
        let env = environment();
        let deep = |n: usize| format!("{}1{} == 1", "(".repeat(n), ")".repeat(n));
        // Parsing the deepest accepted nesting takes more than a test thread's stack in a debug
        // build: the policy compiler gives it a thread of its own, as here.
        let accepted = std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn({
                let (env, source) = (Arc::clone(&env), deep(MAX_NESTING));
                move || Condition::compile(&env, &source).is_ok()
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(accepted);
        let refused = Condition::compile(&env, &deep(MAX_NESTING + 1)).unwrap_err();
        assert!(refused.contains("nested 33 levels deep"), "{refused}");
        // Brackets inside string literals are text, not nesting.
        let quoted = format!("'{}' == \"{}\"", "(".repeat(40), "[\\\"".repeat(40));
        assert_eq!(nesting(&quoted), 0);
        assert!(Condition::compile(&env, &quoted).is_ok());
        assert_eq!(nesting("a[b[c]] && f((1))"), 2);
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
