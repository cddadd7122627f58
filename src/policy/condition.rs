//! CEL conditions, parsed once when the policy is compiled and evaluated against a request.
//!
//! Variables: `request` (`operation`, `method`, `host`, `path`, `query`, `headers`, `attributes`,
//! `context`), `claims` (the verified token's claims; empty without a token), `now` (unix seconds)
//! and `risk` (the request's count of each risk signal, by name).

use std::{
    cell::{OnceCell, Ref, RefCell},
    collections::HashMap,
    sync::Arc,
};

use cel::{
    Context, Env, Program, Value,
    common::{
        types::{CelBool, CelDouble, CelInt, CelList, CelMap, CelMapKey, CelNull, CelString},
        value::Val,
    },
};
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

/// A string literal with upper-case letters compared with the request's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathCase {
    pub literal: String,
    /// Compared with `request.path.lowerAscii()`, which it can never equal or contain.
    pub lowered: bool,
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

/// Deepest syntax tree a condition may have. cel evaluates the tree recursively, a frame or more
/// per level, on a worker thread's 2 MiB stack; an operator chain without brackets
/// (`a + 1 + 1 + …`, `x.f().f()…`, `c ? 1 : c ? 2 : …`) builds a tree as deep as it is long,
/// which the bracket limit does not see, and a few hundred levels overflowed the stack: a
/// process abort, not a panic a guard could catch. `&&` and `||` chains are balanced by the
/// parser and stay shallow.
pub const MAX_DEPTH: usize = 32;

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
        if deeper_than(program.expression(), MAX_DEPTH) {
            return Err(format!(
                "the CEL expression's syntax tree is more than {MAX_DEPTH} levels deep (a long \
                 chain of operators, calls or conditionals): split it into simpler conditions"
            ));
        }
        check_patterns(program.expression())?;
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

    /// What the expression reads of `request.attributes`: the names it reads as
    /// `request.attributes.<name>` or `request.attributes['<name>']`, and whether it also reads
    /// the map some other way (whole, or by a name built at run time), found in CEL's own syntax
    /// tree. For `stepgate check` to compare with the attributes decision records keep.
    pub fn attribute_reads(&self) -> (Vec<String>, bool) {
        let (mut names, mut other) = (Vec::new(), false);
        if self.uses.request {
            collect_attribute_reads(self.program.expression(), &mut names, &mut other);
        }
        (names, other)
    }

    /// The string literals with upper-case letters the expression compares `request.path` with
    /// ([`collect_path_case`]), for `stepgate check` to warn of.
    pub fn path_case_mixups(&self) -> Vec<PathCase> {
        let mut found = Vec::new();
        if self.uses.request {
            collect_path_case(self.program.expression(), &mut found);
        }
        found
    }

    /// The string literals of an expression that reads `request` (which may compare one with
    /// the path: `request.path.endsWith(":search")`), for the characters rules spell as they
    /// are ([`crate::request::path::Spelled`]); none for one that does not.
    pub fn request_literals(&self) -> Vec<String> {
        let mut found = Vec::new();
        if self.uses.request {
            for_each_expr(self.program.expression(), &mut |e| {
                found.extend(string_literal(e).map(str::to_owned));
            });
        }
        found
    }

    /// Whether the expression reads the `claims` variable.
    pub fn reads_claims(&self) -> bool {
        self.uses.claims
    }

    /// [`Self::evaluate_readings`], once per request: a second call with the same `input` and
    /// `how` answers as the first did. For the policy's own conditions only (a matcher's `when`):
    /// the answer is kept by the condition's address, which must outlive `input`.
    pub(crate) fn evaluate_once(
        &self,
        input: &CelInput<'_>,
        how: Readings,
    ) -> Result<bool, String> {
        let key = (std::ptr::from_ref(self) as usize, how);
        if let Some((_, answer)) = input.answers.borrow().iter().find(|(k, _)| *k == key) {
            return answer.clone();
        }
        let answer = self.evaluate_readings(input, how);
        input.answers.borrow_mut().push((key, answer.clone()));
        answer
    }

    /// Evaluates on each reading of the request (see [`CelInput::with_readings`]) that could
    /// change its answer, and combines the answers as `how` says. An error on either reading is
    /// the answer, as it is for one.
    pub fn evaluate_readings(&self, input: &CelInput<'_>, how: Readings) -> Result<bool, String> {
        let first = self.evaluate(input)?;
        if !self.uses.request {
            return Ok(first);
        }
        let mut answer = first;
        let mut reading = input.other_reading.as_deref();
        while let Some(other) = reading {
            reading = other.other_reading.as_deref();
            if other.escalations_only && how != Readings::Any {
                continue;
            }
            let next = self.evaluate(other)?;
            match how {
                Readings::Every => answer &= next,
                Readings::Any => answer |= next,
                Readings::Agree if next == first => {}
                Readings::Agree => {
                    return Err(format!(
                        "{:?} holds for one reading of the request and not for another (the \
                         path in its own letter case or in lower case, with or without its \
                         trailing slash or the extension of its last segment, a HEAD as itself \
                         or as a GET): refused rather than decided on one",
                        self.source
                    ));
                }
            }
        }
        Ok(answer)
    }

    /// Evaluates to a boolean. Any error, or a non-boolean result, is an `Err` with a message; the
    /// caller decides what failing closed means at its place.
    pub fn evaluate(&self, input: &CelInput<'_>) -> Result<bool, String> {
        let shared = input.shared(self.uses);
        let mut ctx = shared.new_inner_scope();
        if self.uses.risk {
            ctx.add_variable_as_val("risk", input.risk());
        }
        match self.program.execute(&ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "{:?} evaluated to {:?}, not a boolean",
                self.source,
                other.type_of()
            )),
            Err(e) => Err(format!(
                "{:?} could not be evaluated: {}",
                self.source,
                describe(&e, &self.source)
            )),
        }
    }
}

/// What went wrong in an evaluation, without the values involved: cel's own messages print its
/// operands in full (a claim, a header's value, the whole header map with the bearer token), and
/// the message reaches the decision log, the denial's body and its `WWW-Authenticate`. Types and
/// operators only; a key or name only where the condition's own text holds it.
fn describe(error: &cel::ExecutionError, source: &str) -> String {
    use cel::ExecutionError as E;
    let named = |name: &str| {
        if !name.is_empty() && source.contains(name) {
            format!(" {name:?}")
        } else {
            String::new()
        }
    };
    // A value's type with its article: "an int", "a string".
    let a = |value: &cel::Value| {
        let kind = value.type_of().to_string();
        let article = if kind.starts_with(['i', 'o']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {kind}")
    };
    #[allow(deprecated)] // Variants cel still returns.
    match error {
        E::InvalidArgumentCount { expected, actual } => {
            format!("{actual} arguments where {expected} are expected")
        }
        E::UnsupportedTargetType { target } => {
            format!("an argument of type {} is not supported", target.type_of())
        }
        E::NotSupportedAsMethod { method, target } => format!(
            "method{} is not supported on type {}",
            named(method),
            target.type_of()
        ),
        E::UnsupportedKeyType(key) => format!("{} cannot be a map key", a(key)),
        E::UnexpectedType { want, .. } => format!("a value is not of the type expected ({want})"),
        E::NoSuchKey(key) => format!("no such key{}", named(key)),
        // An operator's or a function's name: cel's or the policy's own, never a request's.
        E::NoSuchOverload(overload) => format!(
            "no overload of {:?} for ({})",
            overload.function(),
            overload.argument_types().join(", ")
        ),
        E::UndeclaredReference(name) => format!("undeclared reference{}", named(name)),
        E::MissingArgumentOrTarget => "missing argument or target".to_owned(),
        E::ValuesNotComparable(left, right) => {
            format!("{} cannot be compared to {}", a(left), a(right))
        }
        E::UnsupportedUnaryOperator(op, v) => {
            format!("operator {op:?} is not supported on {}", a(v))
        }
        E::UnsupportedBinaryOperator(op, left, right) | E::Overflow(op, left, right) => format!(
            "operator {op:?} on {} and {}{}",
            a(left),
            a(right),
            if matches!(error, E::Overflow(..)) {
                " overflows"
            } else {
                " is not supported"
            }
        ),
        E::UnsupportedMapIndex(v) | E::UnsupportedListIndex(v) => {
            format!("{} cannot index this value", a(v))
        }
        E::UnsupportedIndex(index, target) => format!("{} cannot index {}", a(index), a(target)),
        E::FunctionError { function, .. } => format!("function{} failed", named(function)),
        E::DivisionByZero(_) => "division by zero".to_owned(),
        E::RemainderByZero(_) => "remainder by zero".to_owned(),
        E::IndexOutOfBounds(_) => "index out of bounds".to_owned(),
        E::DuplicateKey(key) => format!("a map literal repeats {} key", a(key)),
        _ => "an expression cel cannot evaluate".to_owned(),
    }
}

/// How a condition's answers on a request's two readings combine. Servers read a path in its own
/// letter case (most) or in lower case (ASP.NET Core, IIS), and answer a HEAD with their GET
/// handlers: a condition reading `request` must hold the same for either, or be read on the
/// side of caution where it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readings {
    /// A requirement's `when`: it grants, so it must hold for both.
    Every,
    /// An escalation's `when`: it asks more, so it applies if it holds for either.
    Any,
    /// A matcher's `when`: it picks the rule, stricter or weaker, so the readings must agree.
    Agree,
}

/// The shared CEL environment (standard library), built once per policy.
pub fn environment() -> Arc<Env> {
    use cel::common::types::{CelBool, CelString};
    let mut env = Env::stdlib();
    // `lowerAscii()` and the other string functions of CEL's strings extension: a condition can
    // compare the path in one letter case (see `Readings`).
    env.add_extension(cel::extensions::strings)
        .expect("CEL's strings extension declares no name twice");
    // `matches()`, as CEL's own (`matches(text, pattern)` and `text.matches(pattern)`), but with
    // each pattern compiled once: cel's compiles it on every call, and a condition calling it
    // in a loop over what a caller sent (`split(",").exists(…)`) took seconds of a worker's time.
    cel::add_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>, id = "matches")
        .expect("cel is built without its own matches()");
    cel::add_member_overload!(env, fn matches: (CelString, CelString) -> Result<CelBool>)
        .expect("cel is built without its own matches()");
    Arc::new(env)
}

/// The most patterns a thread keeps compiled. Patterns are string literals of loaded policies
/// (`check_patterns`), so a few; a long run of reloads with new ones starts the table afresh.
const MAX_COMPILED_PATTERNS: usize = 256;

thread_local! {
    static COMPILED: std::cell::RefCell<HashMap<String, Arc<regex::Regex>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// CEL's `matches()`: whether `pattern` (RE2 syntax, the regex crate's) matches somewhere in
/// `text`, the pattern compiled once per thread.
fn matches(
    text: &cel::common::types::CelString<'_>,
    pattern: &cel::common::types::CelString<'_>,
) -> Result<cel::common::types::CelBool, cel::ExecutionError> {
    let pattern = pattern.inner();
    let compiled = COMPILED.with_borrow_mut(|table| {
        if let Some(compiled) = table.get(pattern) {
            return Ok(Arc::clone(compiled));
        }
        let compiled = Arc::new(regex::Regex::new(pattern).map_err(|err| {
            cel::ExecutionError::FunctionError {
                function: "matches".to_owned(),
                message: format!("'{pattern}' not a valid regex:\n{err}"),
            }
        })?);
        if table.len() >= MAX_COMPILED_PATTERNS {
            table.clear();
        }
        table.insert(pattern.to_owned(), Arc::clone(&compiled));
        Ok(compiled)
    })?;
    Ok(cel::common::types::CelBool::from(
        compiled.is_match(text.inner()),
    ))
}

/// A condition (by its address) and how its readings were combined.
type AnswerKey = (usize, Readings);

/// The variables of one request's evaluations, handed to CEL as values that borrow the request's
/// own strings and maps: nothing is copied, an expression that does not read a variable costs
/// nothing for it, and a variable is converted once per request, not once per condition that
/// reads it. A request's attributes may hold `limits.max_attribute_values` values, and an
/// anonymous caller's request is matched against every matcher condition on its path before its
/// missing token is answered: converted for each condition, 1000 values against 20 conditions
/// took 1.5 ms (`cargo bench --bench engine -- anonymous`).
pub struct CelInput<'a> {
    env: &'a Arc<Env>,
    request: &'a AccessRequest,
    normalized_path: Option<&'a str>,
    /// The method this reading sees, if not the request's own (a HEAD read as a GET).
    method: Option<&'a str>,
    /// The request's other reading, when it has one that differs (see [`Self::with_readings`]).
    other_reading: Option<Box<CelInput<'a>>>,
    /// A reading only escalations see (the path without its extension): a matcher or a
    /// requirement that tests the extension (`endsWith(".pdf")`) would otherwise never agree
    /// with it, while an escalation only ever asks more on it.
    escalations_only: bool,
    claims: Option<&'a Map<String, Json>>,
    now: i64,
    /// The risk signals' counts for this request, by name (read only by expressions that use them).
    risk_counts: Option<&'a dyn Fn() -> Map<String, Json>>,
    risk_value: OnceCell<Map<String, Json>>,
    /// The variables converted so far (`risk` aside: each evaluation's own scope holds it), in
    /// two scopes, the second with `request.headers` and the first without: a condition sees the
    /// headers only if it names them, whichever conditions ran before it.
    scopes: [OnceCell<RefCell<Context<'a, 'a>>>; 2],
    /// The answers of the conditions evaluated with [`Condition::evaluate_once`], by the
    /// condition's address: a rule search runs once per reading of the path (up to five), and a
    /// matcher's `when` answers the same in each.
    answers: RefCell<Vec<(AnswerKey, Result<bool, String>)>>,
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
            method: None,
            other_reading: None,
            escalations_only: false,
            claims,
            now,
            risk_counts: None,
            risk_value: OnceCell::new(),
            scopes: Default::default(),
            answers: RefCell::new(Vec::new()),
        }
    }

    /// The scope of variables for an expression that `uses` them, with every one it reads (but
    /// `risk`) converted.
    fn shared(&self, uses: Uses) -> Ref<'_, Context<'a, 'a>> {
        let context = self.scopes[usize::from(uses.headers)]
            .get_or_init(|| RefCell::new(Context::with_env(Arc::clone(self.env))));
        for (name, wanted) in [
            ("request", uses.request),
            ("claims", uses.claims),
            ("now", uses.now),
        ] {
            if wanted && context.borrow().get_variable(name).is_none() {
                let value: Box<dyn Val + 'a> = match name {
                    "request" => self.request(uses.headers),
                    "claims" => self.claims(),
                    _ => Box::new(CelInt::from(self.now)),
                };
                context.borrow_mut().add_variable_as_val(name, value);
            }
        }
        context.borrow()
    }

    /// Adds the readings of the path `paths` holds (without its trailing slash, without the
    /// extension of its last segment: what some upstreams route it as), each evaluated as the
    /// others are and combined the same way ([`Self::with_readings`]).
    /// Each path comes in its own case and in lower case (`paths` holds both), and a HEAD is
    /// read as itself and as a GET on each; `escalations_only` for the extension's readings.
    pub fn with_path_readings(mut self, paths: impl IntoIterator<Item = (&'a str, bool)>) -> Self {
        let head = self
            .request
            .http
            .as_ref()
            .is_some_and(|h| h.method == "HEAD");
        for (path, escalations_only) in paths {
            if Some(path) == self.normalized_path {
                continue;
            }
            let methods: &[Option<&'a str>] = if head { &[None, Some("GET")] } else { &[None] };
            for &method in methods {
                let mut reading =
                    Self::new(self.env, self.request, Some(path), self.claims, self.now);
                reading.risk_counts = self.risk_counts;
                reading.method = method;
                reading.escalations_only = escalations_only;
                let mut slot = &mut self.other_reading;
                while slot.is_some() {
                    slot = &mut slot.as_mut().expect("a reading").other_reading;
                }
                *slot = Some(Box::new(reading));
            }
        }
        self
    }

    /// The request's other readings: the path as `lowered` (the normalised path in lower case,
    /// as rules match it) and a HEAD as a GET, each with the other (a HEAD in its own case read
    /// as a GET too). Conditions that read `request` are evaluated on each that differs
    /// ([`Condition::evaluate_readings`]). Call after [`Self::with_risk`], and before
    /// [`Self::with_path_readings`].
    pub fn with_readings(mut self, lowered: Option<&'a str>) -> Self {
        let head = self
            .request
            .http
            .as_ref()
            .is_some_and(|h| h.method == "HEAD");
        // Every pairing of the path in its case or in lower case with the method as sent or, for
        // a HEAD, as a GET (an upstream in either case runs its GET handler for a HEAD), but the
        // request's own.
        let paths = [self.normalized_path, lowered];
        let paths = if lowered == self.normalized_path {
            &paths[..1]
        } else {
            &paths[..]
        };
        let methods: &[Option<&'a str>] = if head { &[None, Some("GET")] } else { &[None] };
        let mut slot = &mut self.other_reading;
        for &path in paths {
            for &method in methods {
                if path == self.normalized_path && method.is_none() {
                    continue;
                }
                while slot.is_some() {
                    slot = &mut slot.as_mut().expect("a reading").other_reading;
                }
                let mut reading = Self::new(self.env, self.request, path, self.claims, self.now);
                reading.risk_counts = self.risk_counts;
                reading.method = method;
                *slot = Some(Box::new(reading));
            }
        }
        self
    }

    /// Where `risk` comes from: called at most once, by the first expression that reads it.
    pub fn with_risk(mut self, counts: &'a dyn Fn() -> Map<String, Json>) -> Self {
        self.risk_counts = Some(counts);
        self
    }

    fn risk(&self) -> Box<dyn Val + '_> {
        let counts = self
            .risk_value
            .get_or_init(|| self.risk_counts.map(|f| f()).unwrap_or_default());
        object_val(counts)
    }

    fn claims(&self) -> Box<dyn Val + 'a> {
        match self.claims {
            Some(claims) => object_val(claims),
            None => Box::new(CelMap::default()),
        }
    }

    /// `request`: operation, method, host, path (normalized), query, headers (only for
    /// expressions that name them), attributes, context and source.
    fn request(&self, with_headers: bool) -> Box<dyn Val + 'a> {
        let r = self.request;
        let http = r.http.as_ref();
        let text = |value: Option<&'a str>| -> Box<dyn Val + 'a> {
            Box::new(CelString::from(value.unwrap_or_default()))
        };
        let query = http.and_then(|h| h.target.split_once('?').map(|(_, q)| q));
        let headers: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = match http {
            Some(h) if with_headers => h
                .headers
                .iter()
                .map(|(k, v)| (CelMapKey::from(k), text(Some(v))))
                .collect(),
            _ => HashMap::new(),
        };
        let source = r.source.as_ref();
        let source: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = HashMap::from([
            (
                CelMapKey::from("address"),
                text(source.map(|s| s.address.as_str())),
            ),
            (
                CelMapKey::from("principal"),
                text(source.map(|s| s.principal.as_str())),
            ),
        ]);
        let entries: [(&'static str, Box<dyn Val + 'a>); 9] = [
            ("operation", text(r.operation.as_deref())),
            (
                "method",
                text(self.method.or(http.map(|h| h.method.as_str()))),
            ),
            ("host", text(http.map(|h| h.host.as_str()))),
            ("path", text(self.normalized_path)),
            ("query", text(query)),
            ("headers", Box::new(CelMap::from(headers))),
            ("attributes", object_val(&r.attributes)),
            ("context", object_val(&r.context)),
            ("source", Box::new(CelMap::from(source))),
        ];
        let map: HashMap<CelMapKey<'a>, Box<dyn Val + 'a>> = entries
            .into_iter()
            .map(|(k, v)| (CelMapKey::from(k), v))
            .collect();
        Box::new(CelMap::from(map))
    }
}

/// A JSON object as a CEL map that borrows its strings.
fn object_val<'v>(object: &'v Map<String, Json>) -> Box<dyn Val + 'v> {
    Box::new(CelMap::from(
        object
            .iter()
            .map(|(k, v)| (CelMapKey::from(k.as_str()), json_val(v)))
            .collect::<HashMap<_, _>>(),
    ))
}

/// A JSON value as CEL sees it: an integer is an `int` (a `double` past `int`'s range), any
/// other number a `double`. CEL does no arithmetic between `int` and `uint`, so a claim's
/// `exp` read as a `uint` made `claims.exp - now` an error.
fn json_val<'v>(json: &'v Json) -> Box<dyn Val + 'v> {
    match json {
        Json::Null => Box::new(CelNull),
        Json::Bool(b) => Box::new(CelBool::from(*b)),
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (_, Some(i), _) => Box::new(CelInt::from(i)),
            // Past `int`'s range: a `double`, as every other number, rather than a `uint`
            // whose arithmetic with every `int` fails.
            (Some(u), None, _) => Box::new(CelDouble::from(u as f64)),
            (None, None, f) => Box::new(CelDouble::from(f.unwrap_or(f64::NAN))),
        },
        Json::String(s) => Box::new(CelString::from(s.as_str())),
        Json::Array(items) => Box::new(CelList::from(
            items.iter().map(json_val).collect::<Vec<_>>(),
        )),
        Json::Object(object) => object_val(object),
    }
}

/// Calls `f` on `e` and every expression under it.
fn for_each_expr(e: &cel::IdedExpr, f: &mut impl FnMut(&cel::IdedExpr)) {
    use cel::common::ast::{EntryExpr, Expr};
    f(e);
    match &e.expr {
        Expr::Select(select) => for_each_expr(&select.operand, f),
        Expr::Call(call) => {
            for e in call.target.iter().map(|t| &**t).chain(&call.args) {
                for_each_expr(e, f);
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
                for_each_expr(e, f);
            }
        }
        Expr::List(list) => list.elements.iter().for_each(|e| for_each_expr(e, f)),
        Expr::Map(cel::common::ast::MapExpr { entries })
        | Expr::Struct(cel::common::ast::StructExpr { entries, .. }) => {
            for entry in entries {
                match &entry.expr {
                    EntryExpr::MapEntry(m) => {
                        for_each_expr(&m.key, f);
                        for_each_expr(&m.value, f);
                    }
                    EntryExpr::StructField(field) => for_each_expr(&field.value, f),
                }
            }
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// Whether `e`'s syntax tree is more than `limit` levels deep; it descends no deeper than that.
fn deeper_than(e: &cel::IdedExpr, limit: usize) -> bool {
    use cel::common::ast::{EntryExpr, Expr};
    let Some(below) = limit.checked_sub(1) else {
        return true;
    };
    let deeper = |child: &cel::IdedExpr| deeper_than(child, below);
    match &e.expr {
        Expr::Select(select) => deeper(&select.operand),
        Expr::Call(call) => call
            .target
            .iter()
            .map(|t| &**t)
            .chain(&call.args)
            .any(deeper),
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .any(deeper),
        Expr::List(list) => list.elements.iter().any(deeper),
        Expr::Map(cel::common::ast::MapExpr { entries })
        | Expr::Struct(cel::common::ast::StructExpr { entries, .. }) => {
            entries.iter().any(|entry| match &entry.expr {
                EntryExpr::MapEntry(m) => deeper(&m.key) || deeper(&m.value),
                EntryExpr::StructField(field) => deeper(&field.value),
            })
        }
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => false,
    }
}

/// `variable.field` or `variable['field']`.
fn is_field(e: &cel::IdedExpr, variable: &str, field: &str) -> bool {
    use cel::common::ast::{Expr, LiteralValue, operators};
    let is_variable = |e: &cel::IdedExpr| matches!(&e.expr, Expr::Ident(name) if name == variable);
    match &e.expr {
        Expr::Select(select) => select.field == field && is_variable(&select.operand),
        Expr::Call(call) => {
            call.func_name == operators::INDEX
                && matches!(call.args.as_slice(), [map, key] if is_variable(map)
                    && matches!(&key.expr, Expr::Literal(LiteralValue::String(k)) if k.inner() == field))
        }
        _ => false,
    }
}

/// A string literal's text.
/// `matches()` compiles its pattern each time it runs. A literal pattern is checked here, once,
/// so that a policy with an invalid one is refused rather than answering `condition_error` on
/// every request; a pattern built at run time (from a header, a claim) is refused: it would have
/// stepgate compile a regular expression a caller wrote, on every request.
fn check_patterns(e: &cel::IdedExpr) -> Result<(), String> {
    use cel::common::ast::Expr;
    let mut problem = None;
    for_each_expr(e, &mut |e| {
        let Expr::Call(call) = &e.expr else { return };
        if call.func_name != "matches" || problem.is_some() {
            return;
        }
        // `text.matches(pattern)` or `matches(text, pattern)`.
        let pattern = if call.target.is_some() {
            call.args.first()
        } else {
            call.args.get(1)
        };
        problem = match pattern.and_then(string_literal) {
            None => Some(
                "matches() takes its pattern as a string literal: a pattern built from the \
                 request would be a regular expression a caller writes"
                    .to_owned(),
            ),
            Some(literal) => regex::Regex::new(literal)
                .err()
                .map(|err| format!("matches() pattern {literal:?} is not a valid regex: {err}")),
        };
    });
    problem.map_or(Ok(()), Err)
}

fn string_literal(e: &cel::IdedExpr) -> Option<&str> {
    use cel::common::ast::{Expr, LiteralValue};
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}

fn collect_attribute_reads(e: &cel::IdedExpr, out: &mut Vec<String>, other: &mut bool) {
    use cel::common::ast::{Expr, operators};
    let attributes = |e: &cel::IdedExpr| is_field(e, "request", "attributes");
    let (mut seen, mut named) = (0, 0);
    for_each_expr(e, &mut |e| {
        if attributes(e) {
            seen += 1;
        }
        match &e.expr {
            Expr::Select(select) if attributes(&select.operand) => {
                named += 1;
                out.push(select.field.clone());
            }
            Expr::Call(call) if call.func_name == operators::INDEX => {
                if let [map, key] = call.args.as_slice()
                    && attributes(map)
                    && let Some(name) = string_literal(key)
                {
                    named += 1;
                    out.push(name.to_owned());
                }
            }
            _ => {}
        }
    });
    if seen > named {
        *other = true;
    }
    out.sort();
    out.dedup();
}

fn collect_risk_reads(e: &cel::IdedExpr, out: &mut Vec<String>) {
    use cel::common::ast::Expr;
    for_each_expr(e, &mut |e| match &e.expr {
        Expr::Select(select) if matches!(&select.operand.expr, Expr::Ident(n) if n == "risk") => {
            out.push(select.field.clone());
        }
        Expr::Call(call) => {
            if let [_, key] = call.args.as_slice()
                && let Some(name) = string_literal(key)
                && is_field(e, "risk", name)
            {
                out.push(name.to_owned());
            }
        }
        _ => {}
    });
}

/// The comparisons of `request.path` (or `request.path.lowerAscii()`) with a string literal that
/// has upper-case letters: `==`, `!=`, `in` a list, `startsWith`, `endsWith` and `contains`.
/// Rules read the path in lower case as well, so such a comparison fails on that reading
/// (docs/policy.md, "Two readings of a request"); on `lowerAscii()` it never holds at all.
fn collect_path_case(e: &cel::IdedExpr, out: &mut Vec<PathCase>) {
    use cel::common::ast::{Expr, operators};
    let path = |e: &cel::IdedExpr| -> Option<bool> {
        if is_field(e, "request", "path") {
            return Some(false);
        }
        match &e.expr {
            Expr::Call(call)
                if call.func_name == "lowerAscii"
                    && call.args.is_empty()
                    && call
                        .target
                        .as_deref()
                        .is_some_and(|t| is_field(t, "request", "path")) =>
            {
                Some(true)
            }
            _ => None,
        }
    };
    fn upper(e: &cel::IdedExpr) -> Option<&str> {
        string_literal(e).filter(|s| s.bytes().any(|b| b.is_ascii_uppercase()))
    }
    for_each_expr(e, &mut |e| {
        let Expr::Call(call) = &e.expr else { return };
        let mut found = |lowered: bool, literal: &str| {
            out.push(PathCase {
                literal: literal.to_owned(),
                lowered,
            })
        };
        match (
            call.func_name.as_str(),
            call.target.as_deref(),
            call.args.as_slice(),
        ) {
            (operators::EQUALS | operators::NOT_EQUALS, None, [l, r]) => {
                for (side, other) in [(l, r), (r, l)] {
                    if let (Some(lowered), Some(literal)) = (path(side), upper(other)) {
                        found(lowered, literal);
                    }
                }
            }
            (operators::IN, None, [item, list]) => {
                if let (Some(lowered), Expr::List(list)) = (path(item), &list.expr) {
                    list.elements
                        .iter()
                        .filter_map(upper)
                        .for_each(|l| found(lowered, l));
                }
            }
            ("startsWith" | "endsWith" | "contains", Some(target), [arg]) => {
                if let (Some(lowered), Some(literal)) = (path(target), upper(arg)) {
                    found(lowered, literal);
                }
            }
            _ => {}
        }
    });
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

    #[test]
    fn the_attributes_an_expression_reads_are_named_or_it_is_said_that_it_reads_more() {
        let env = environment();
        let reads = |source: &str| Condition::compile(&env, source).unwrap().attribute_reads();
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            reads("has(request.attributes.amount) && request.attributes.amount > 10000"),
            (names(&["amount"]), false)
        );
        assert_eq!(
            reads("request.attributes['currency'] == 'EUR' && request.attributes.amount > 1"),
            (names(&["amount", "currency"]), false)
        );
        assert_eq!(reads("'amount' in request.attributes"), (vec![], true));
        assert_eq!(
            reads("request.attributes[request.operation] == 1"),
            (vec![], true)
        );
        assert_eq!(reads("request.operation == 'x'"), (vec![], false));
        assert_eq!(reads("claims.amount > 1"), (vec![], false));
    }

    /// A claim's integer is an `int` whatever its sign, so that arithmetic with `now` (an `int`)
    /// and with integer literals works; one past `int`'s range is a `double`.
    #[test]
    fn claim_integers_do_arithmetic_with_now_and_literals() {
        let claims = json!({"exp": 1_700_000_600, "auth_time": 1_699_999_900, "lvl": 2, "neg": -3,
                            "huge": u64::MAX});
        for (source, expected) in [
            ("claims.exp - now > 60", true),
            ("now - claims.auth_time < 300", true),
            ("claims.lvl + 1 == 3", true),
            ("claims.neg + 1 == -2", true),
            ("claims.lvl > 1.5", true),
            // Past int's range a double, which compares and adds with ints.
            ("claims.huge > 1.0e19 && claims.huge + 1.0 > 1.0e19", true),
        ] {
            assert_eq!(
                eval(source, json!({}), claims.clone()),
                Ok(expected),
                "{source}"
            );
        }
    }

    /// A matcher's `when` is evaluated once per request, however many searches of the rules ask.
    #[test]
    fn a_condition_is_evaluated_once_per_request_input() {
        let env = environment();
        let request = AccessRequest {
            operation: Some("payments.wire_transfer".into()),
            attributes: json!({"amount": 5}).as_object().unwrap().clone(),
            ..Default::default()
        };
        let input = CelInput::new(&env, &request, None, None, 1_700_000_000);
        let small = Condition::compile(&env, "request.attributes.amount < 10").unwrap();
        let large = Condition::compile(&env, "request.attributes.amount > 10").unwrap();
        for _ in 0..5 {
            assert_eq!(small.evaluate_once(&input, Readings::Agree), Ok(true));
            assert_eq!(large.evaluate_once(&input, Readings::Agree), Ok(false));
        }
        assert_eq!(
            input.answers.borrow().len(),
            2,
            "one answer kept per condition"
        );
    }

    /// `matches()` reads as CEL's own does, with each pattern compiled once per thread however
    /// many values a caller makes it run over.
    #[test]
    fn matches_compiles_each_pattern_once_per_thread() {
        let items: Vec<String> = (0..500).map(|i| format!("team-{i}")).collect();
        let attributes = json!({"groups": items.join(",")});
        for (source, expected) in [
            (
                r#"request.attributes.groups.split(",").exists(g, g.matches("^team-499$"))"#,
                true,
            ),
            (
                r#"request.attributes.groups.split(",").all(g, g.matches("^team-[0-9]+$"))"#,
                true,
            ),
            (
                r#"request.attributes.groups.split(",").exists(g, matches(g, "(?i)^ADMIN$"))"#,
                false,
            ),
            (r#"matches("foobar", "o+b")"#, true),
            (r#""foobar".matches("^bar")"#, false),
        ] {
            assert_eq!(
                eval(source, attributes.clone(), json!({})),
                Ok(expected),
                "{source}"
            );
        }
        COMPILED.with_borrow(|table| {
            for pattern in ["^team-499$", "^team-[0-9]+$", "(?i)^ADMIN$", "o+b", "^bar"] {
                assert!(table.contains_key(pattern), "{pattern} not kept compiled");
            }
        });
    }

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

    /// Whether two CEL values are the same: of one type, equal, and (for maps and lists) made of
    /// the same values, kind for kind (CEL's equality alone takes `1u` for `1`).
    /// Whether `ours` is `theirs` (serde's conversion), but for a non-negative integer, which
    /// serde makes a `uint` and stepgate an `int` of the same value (a `double` past `int`'s
    /// range).
    fn same(ours: &dyn Val, theirs: &dyn Val) -> bool {
        if let Some(u) = theirs.downcast_ref::<cel::common::types::CelUInt>() {
            if let Some(i) = ours.downcast_ref::<CelInt>() {
                return u64::try_from(*i.inner()).is_ok_and(|i| i == *u.inner());
            }
            if let Some(d) = ours.downcast_ref::<CelDouble>() {
                return *d.inner() == *u.inner() as f64;
            }
        }
        let (a, b) = (ours, theirs);
        if a.get_type() != b.get_type() || !a.equals(b) {
            return false;
        }
        if let (Some(x), Some(y)) = (a.downcast_ref::<CelMap>(), b.downcast_ref::<CelMap>()) {
            return x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same(&**v, &**w)));
        }
        if let (Some(x), Some(y)) = (a.downcast_ref::<CelList>(), b.downcast_ref::<CelList>()) {
            return x.len() == y.len() && x.iter().zip(y.iter()).all(|(v, w)| same(&**v, &**w));
        }
        true
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Json> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::from),
            any::<i64>().prop_map(Json::from),
            any::<u64>().prop_map(Json::from),
            (-1e12f64..1e12).prop_map(Json::from),
            "[a-z\\u{e9}\"\\\\]{0,6}".prop_map(Json::from),
        ];
        leaf.prop_recursive(4, 40, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Json::Array),
                proptest::collection::vec(("[a-c]{1,2}", inner), 0..5)
                    .prop_map(|entries| Json::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The borrowed conversion gives CEL what the serde one (`cel::to_value`) gives.
        #[test]
        fn borrowed_values_are_what_cel_would_make(json in any_json()) {
            let reference: Box<dyn Val> = cel::to_value(json.clone()).unwrap().try_into().unwrap();
            proptest::prop_assert!(same(&*json_val(&json), &*reference), "{json}");
        }
    }

    #[test]
    fn matches_takes_a_valid_literal_pattern_only() {
        let env = environment();
        assert_eq!(
            eval(
                "claims.dept.matches('^ops-[a-z]+$')",
                json!({}),
                json!({"dept": "ops-eu"})
            ),
            Ok(true)
        );
        assert_eq!(
            eval(
                "matches(claims.dept, '^ops-')",
                json!({}),
                json!({"dept": "sales"})
            ),
            Ok(false)
        );
        for (source, why) in [
            ("claims.dept.matches(claims.pattern)", "string literal"),
            (
                "matches(claims.dept, request.attributes.p)",
                "string literal",
            ),
            (
                "claims.dept.matches('^ops-' + claims.region)",
                "string literal",
            ),
            ("claims.dept.matches('(unclosed')", "not a valid regex"),
        ] {
            let refused = Condition::compile(&env, source).map(|_| ()).unwrap_err();
            assert!(refused.contains(why), "{source}: {refused}");
        }
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

    /// An evaluation's error names types and operators, never the values: cel's own messages
    /// print its operands, and the message reaches the log, the denial and its challenge.
    #[test]
    fn an_evaluation_error_names_no_value() {
        let env = environment();
        let mut headers = crate::request::Headers::default();
        headers.insert("authorization".to_owned(), "Bearer SECRET-TOKEN".to_owned());
        headers.insert("x-units".to_owned(), "SECRET-UNITS".to_owned());
        let request = AccessRequest {
            http: Some(crate::request::HttpAttributes::new(
                "GET", "h", "/a", headers,
            )),
            attributes: json!({"secret": "SECRET-ATTRIBUTE"})
                .as_object()
                .unwrap()
                .clone(),
            ..Default::default()
        };
        let claims = json!({"tier": "SECRET-CLAIM", "quota": 100})
            .as_object()
            .unwrap()
            .clone();
        let input = CelInput::new(&env, &request, Some("/a"), Some(&claims), 5);
        for (source, says) in [
            (
                "'tier-' + claims.quota == 'tier-1'",
                "operator \"add\" on a string and an int is not",
            ),
            (
                "claims.quota - request.headers['x-units'] >= 0",
                "\"sub\" on an int and a string",
            ),
            (
                "request.headers + 1 > 0",
                "operator \"add\" on a map and an int",
            ),
            ("claims[claims.tier] == 1", "no such key"),
            (
                "claims.tier < 1",
                "no overload of \"_<_\" for (string, int)",
            ),
            ("int(claims.tier) == 1", "function \"int\" failed"),
            (
                "claims.quota / (claims.quota - 100) == 1",
                "division by zero",
            ),
        ] {
            let error = Condition::compile(&env, source)
                .unwrap()
                .evaluate(&input)
                .expect_err(source);
            assert!(!error.contains("SECRET"), "{source}: {error}");
            assert!(error.contains(says), "{source}: {error}");
        }
        // A key the condition names is named.
        let error = Condition::compile(&env, "claims.missing == 1")
            .unwrap()
            .evaluate(&input)
            .unwrap_err();
        assert!(error.ends_with("no such key \"missing\""), "{error}");
    }

    #[test]
    fn headers_are_converted_only_for_expressions_that_name_them() {
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
        // A name built at run time sees no headers (fails closed).
        assert_eq!(reads("size(request['head' + 'ers']) == 0"), Ok(true));
        assert_eq!(reads("request.headers['x-device'] == 'managed'"), Ok(true));
        assert_eq!(reads("claims.tid == 't1' && now == 5"), Ok(true));
        // The headers are converted for this request now, and still only seen where named.
        assert_eq!(reads("size(request['head' + 'ers']) == 0"), Ok(true));
    }

    /// One request's conditions share what they convert: each, whatever ran before it on the
    /// same input, answers as it does alone.
    #[test]
    fn conditions_sharing_a_request_answer_as_they_do_alone() {
        let env = environment();
        let mut headers = crate::request::Headers::default();
        headers.insert("x-device".to_owned(), "managed".to_owned());
        let request = AccessRequest {
            operation: Some("payments.wire_transfer".into()),
            http: Some(crate::request::HttpAttributes::new(
                "GET", "h", "/a", headers,
            )),
            attributes: json!({"amount": 25000}).as_object().unwrap().clone(),
            ..Default::default()
        };
        let claims = json!({"tid": "t1"}).as_object().unwrap().clone();
        let risk = || json!({"failures": 3}).as_object().unwrap().clone();
        let input = || CelInput::new(&env, &request, Some("/a"), Some(&claims), 5).with_risk(&risk);
        let sources = [
            "request.attributes.amount > 10000",
            "request.headers['x-device'] == 'managed'",
            "size(request['head' + 'ers']) == 0",
            "claims.tid == 't1'",
            "risk.failures >= 3 && now == 5",
            "request.operation.startsWith('payments.') && claims.tid == 't2'",
            "request.attributes.missing > 1",
            "'x-device' in request.headers && risk.failures == 3",
        ];
        let conditions: Vec<Condition> = sources
            .iter()
            .map(|source| Condition::compile(&env, source).unwrap())
            .collect();
        let alone: Vec<_> = conditions.iter().map(|c| c.evaluate(&input())).collect();
        assert_eq!(
            alone.iter().filter(|r| r == &&Ok(true)).count(),
            6,
            "{alone:?}"
        );
        for order in [
            [0, 1, 2, 3, 4, 5, 6, 7],
            [7, 6, 5, 4, 3, 2, 1, 0],
            [1, 2, 0, 6, 3, 5, 7, 4],
        ] {
            let shared = input();
            for i in order {
                assert_eq!(conditions[i].evaluate(&shared), alone[i], "{}", sources[i]);
                assert_eq!(
                    conditions[i].evaluate(&shared),
                    alone[i],
                    "{} again",
                    sources[i]
                );
            }
        }
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

    /// An operator chain without brackets builds a syntax tree as deep as it is long: past
    /// [`MAX_DEPTH`] it is refused, and the deepest accepted of each shape evaluates on a
    /// worker's 2 MiB stack (in this debug build, whose frames are the larger).
    #[test]
    fn syntax_trees_past_the_depth_limit_are_refused_and_those_within_evaluate_on_a_worker_stack() {
        let env = environment();
        type Build = fn(usize) -> String;
        let shapes: [(&str, Build); 5] = [
            ("sum", |n| {
                format!("request.attributes.a{} > 0", " + 1".repeat(n))
            }),
            ("product", |n| {
                format!("request.attributes.a{} >= 0", " * 1".repeat(n))
            }),
            ("method chain", |n| {
                format!("request.attributes.s{} != ''", ".lowerAscii()".repeat(n))
            }),
            ("conditional chain", |n| {
                format!("{}true", "request.attributes.a == 0 ? false : ".repeat(n))
            }),
            ("select chain", |n| format!("has(claims{})", ".x".repeat(n))),
        ];
        for (shape, build) in shapes {
            let accepted = |n: usize| Condition::compile(&env, &build(n)).is_ok();
            let longest = (1..400).take_while(|&n| accepted(n)).last().unwrap_or(0);
            assert!(longest > 8, "{shape}: only {longest} terms accepted");
            assert!(longest < 400, "{shape}: no limit");
            let refused = Condition::compile(&env, &build(longest + 1)).unwrap_err();
            assert!(
                refused.contains("syntax tree is more than 32 levels deep"),
                "{refused}"
            );
            // The compiled condition crosses to a thread with a worker's stack.
            let source = build(longest);
            let answered = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn({
                    let env = Arc::clone(&env);
                    move || {
                        let condition = Condition::compile(&env, &source).unwrap();
                        let request = AccessRequest {
                            attributes: json!({"a": 1, "s": "x"}).as_object().unwrap().clone(),
                            ..Default::default()
                        };
                        let claims = json!({}).as_object().unwrap().clone();
                        let input = CelInput::new(&env, &request, None, Some(&claims), 5);
                        condition.evaluate(&input)
                    }
                })
                .unwrap()
                .join()
                .unwrap();
            // An answer, not an overflow (which would abort this process); `claims` has no `x`.
            assert!(
                answered.is_ok() || shape == "select chain",
                "{shape}: {answered:?}"
            );
        }
        // `&&` and `||` chains stay shallow: long ones are accepted.
        let long_and = vec!["request.attributes.a > 0"; 300].join(" && ");
        assert!(Condition::compile(&env, &long_and).is_ok());
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
