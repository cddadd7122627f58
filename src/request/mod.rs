//! `AccessRequest`: the one normalised view of a request, whichever door it came through.
//!
//! The ext_authz adapter and the `Decide` adapter each build one of these and nothing else; the
//! engine never sees a wire type. Header names are lower-case here.

mod headers;
pub mod path;

use std::borrow::Cow;

use serde_json::{Map, Value};

pub use headers::Headers;
pub(crate) use headers::check_utf8;

use crate::identity::{Credential, CredentialProblem, bearer};

/// Which front door a request came through (for logs and metrics only: it never changes a decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Door {
    Check,
    Decide,
    Offline,
}

impl Door {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Check => "check",
            Self::Decide => "decide",
            Self::Offline => "offline",
        }
    }
}

/// Bounds on a request's headers (`limits.max_header_count`, `limits.max_header_bytes`) and on a
/// `Decide`'s attributes (`limits.max_attribute_values`, `limits.max_attribute_bytes`). The header
/// defaults admit what Envoy admits with its own defaults (100 headers, 60 KiB), with room for the
/// headers Envoy adds itself before asking (`x-request-id`, `x-forwarded-*`, `x-envoy-*`). The
/// attribute bounds keep what an anonymous caller's attributes cost (each value is converted to
/// JSON, and to CEL once per request if a condition reads `request`) a small multiple of a
/// decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderLimits {
    /// Header entries, pseudo-headers and repeated names included.
    pub max_count: usize,
    /// Bytes of every name and value together.
    pub max_bytes: usize,
    /// Values in a `Decide`'s attributes, at every depth (a list or an object is one, and so is
    /// each of its items).
    pub max_attribute_values: usize,
    /// Bytes of the attributes' keys and strings together.
    pub max_attribute_bytes: usize,
}

impl HeaderLimits {
    pub const DEFAULT: Self = Self {
        max_count: 128,
        max_bytes: 96 * 1024,
        max_attribute_values: 1000,
        max_attribute_bytes: 64 * 1024,
    };
    /// No bound (tests and tools that read any request).
    pub const UNLIMITED: Self = Self {
        max_count: usize::MAX,
        max_bytes: usize::MAX,
        max_attribute_values: usize::MAX,
        max_attribute_bytes: usize::MAX,
    };
}

impl Default for HeaderLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a request cannot be decided on its content. The engine answers it before anything else:
/// `400` for content that is not what its field must hold, `431` past a header limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestProblem {
    /// A field that must be text is not UTF-8 (named as in the protobuf message).
    NotUtf8(&'static str),
    /// A `Decide` call that names neither an operation nor an HTTP request.
    NothingToMatch,
    /// More header entries than [`HeaderLimits::max_count`].
    TooManyHeaders { count: usize, limit: usize },
    /// Header names and values longer than [`HeaderLimits::max_bytes`] together.
    HeadersTooLarge { bytes: usize, limit: usize },
    /// More entries in a map stepgate reads (`context_extensions`) than it keeps.
    TooManyEntries(&'static str),
    /// A `Decide`'s attributes past [`HeaderLimits::max_attribute_values`] (`what`: "values") or
    /// [`HeaderLimits::max_attribute_bytes`] ("bytes").
    AttributesTooLarge { what: &'static str, limit: usize },
    /// Two `Decide` header names that are one name in any case (`Authorization` and
    /// `authorization`): which one a reader takes would be chance.
    DuplicateHeader(String),
    /// An operation longer than [`MAX_OPERATION_BYTES`] or holding a control character: no
    /// policy names one, and it would be copied into every log, record and trace of the request.
    InvalidOperation,
    /// A `Decide` message that does not decode (a string field that is not UTF-8, `attributes`
    /// nested too deep: `api::codec`).
    Undecodable,
}

/// The longest operation decided on, in bytes.
pub const MAX_OPERATION_BYTES: usize = 256;

/// Whether `operation` is one stepgate decides on (see [`RequestProblem::InvalidOperation`]).
pub fn is_valid_operation(operation: &str) -> bool {
    operation.len() <= MAX_OPERATION_BYTES && !operation.chars().any(char::is_control)
}

/// How much of a request-chosen name a message quotes, in characters.
const QUOTED_NAME_CHARS: usize = 64;

impl RequestProblem {
    /// The field a `NotUtf8` problem names, for a path: it is answered as `invalid_path`.
    pub const PATH_FIELD: &'static str = "attributes.request.http.path";

    pub fn describe(&self) -> String {
        match self {
            Self::NotUtf8(field) => format!("{field} is not valid UTF-8"),
            Self::NothingToMatch => {
                "set operation, http, or both: there is nothing to match a rule against".to_owned()
            }
            Self::TooManyHeaders { count, limit } => {
                format!("the request has {count} headers, over the limit of {limit}")
            }
            Self::HeadersTooLarge { bytes, limit } => {
                format!("the request's headers take {bytes} bytes, over the limit of {limit}")
            }
            Self::TooManyEntries(field) => format!("{field} has too many entries"),
            Self::DuplicateHeader(name) => {
                let shown: String = name.chars().take(QUOTED_NAME_CHARS).collect();
                let more = if shown.len() < name.len() { "…" } else { "" };
                format!("the header {shown:?}{more} is given twice, in different case")
            }
            Self::InvalidOperation => format!(
                "the operation is longer than {MAX_OPERATION_BYTES} bytes or holds a control \
                 character"
            ),
            Self::AttributesTooLarge { what, limit } => {
                format!("the request's attributes hold more than {limit} {what}, the limit")
            }
            Self::Undecodable => "the request does not decode: a string field that is not UTF-8, \
                                  or attributes nested deeper than the decoder's limit"
                .to_owned(),
        }
    }
}

/// The credential as presented, before any parsing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PresentedCredential {
    #[default]
    None,
    /// A bare token (the `Decide` `token` field).
    Token(String),
    /// An `Authorization` header value.
    Authorization(String),
    /// The request's own `authorization` header (`http.headers`), read where it is rather than
    /// copied (an Envoy `Check`).
    AuthorizationHeader,
    /// Something that is refused before any parsing: two headers, non-UTF-8 bytes.
    Unusable(CredentialProblem),
    /// What verification established about a token, taken as established: `stepgate replay`
    /// re-deciding a decision record (which holds no token). Never from the wire.
    Verified(Established),
}

/// A token taken as verified ([`PresentedCredential::Verified`]); equal only to itself.
#[derive(Debug, Clone)]
pub struct Established(pub std::sync::Arc<crate::identity::VerifiedToken>);

impl PartialEq for Established {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Established {}

/// HTTP attributes of the request being authorised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpAttributes {
    /// Upper-case method.
    pub method: String,
    /// Host without port or trailing dot, lower-case.
    pub host: String,
    /// The host as sent, lower-case, when it has a port or a trailing dot (`host` without them):
    /// Envoy picks its virtual host with them, so host rules read both ([`Self::host_as_sent`]).
    pub host_with_port: Option<Box<str>>,
    /// Request target as sent (path and query).
    pub target: String,
    pub headers: Headers,
    /// A field the request gave that its pseudo-header (or `host` header) contradicts
    /// ([`Self::with_pseudo_headers`]): which one, for the refusal.
    pub pseudo_conflict: Option<&'static str>,
}

/// A network peer of the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// IP address (without port).
    pub address: String,
    /// Identity from the peer certificate (URI SAN, e.g. `spiffe://cluster.local/ns/a/sa/b`).
    pub principal: String,
}

impl Peer {
    /// `address` in one spelling: IPv4 even when a dual-stack proxy wrote an IPv4 client in
    /// IPv6's mapped form (`::ffff:192.0.2.7`), and an IPv6 address as RFC 5952 writes it
    /// (`2001:DB8:0::1` is `2001:db8::1`): counted, blocked, logged and recorded as one source
    /// whichever way it arrives.
    pub fn new(address: &str, principal: String) -> Self {
        let address = match address.parse::<std::net::IpAddr>() {
            // An IPv4 address parses only from its one spelling (four decimal numbers without
            // leading zeros), which is the text as given: not formatted again (a thousand
            // instructions, on every request through Envoy).
            Ok(std::net::IpAddr::V4(_)) => address.to_owned(),
            Ok(ip) => ip.to_canonical().to_string(),
            Err(_) => address.to_owned(),
        };
        Self { address, principal }
    }
}

/// A query parameter's name: what comes before its first `=` (a byte search: `str`'s search for
/// a `char` costs more to set up than a parameter takes to scan).
pub(crate) fn parameter_name(pair: &str) -> &str {
    &pair[..pair.bytes().position(|b| b == b'=').unwrap_or(pair.len())]
}

/// One request to decide.
#[derive(Debug, Clone, Default)]
pub struct AccessRequest {
    pub credential: PresentedCredential,
    pub operation: Option<String>,
    pub http: Option<HttpAttributes>,
    /// Free-form attributes for CEL conditions (`request.attributes`).
    pub attributes: Map<String, Value>,
    /// Where Envoy's `context_extensions` land, also visible to CEL as `request.context`.
    pub context: Map<String, Value>,
    /// The downstream peer as Envoy saw it (CEL `request.source`): with mTLS in a mesh, its
    /// `principal` is the workload's SPIFFE id.
    pub source: Option<Peer>,
    /// The client certificate the request's TLS connection was authenticated with, as the proxy
    /// or caller gave it: read only for a token bound to one (RFC 8705).
    pub client_certificate: Option<crate::identity::ClientCertificate>,
    /// How many header entries the proxy holds for this request (Envoy `Check` only, pseudo-headers
    /// included): with the policy's `max_request_headers`, whether identity headers still fit.
    pub proxy_header_count: Option<usize>,
    pub explain: bool,
    /// Set when the content cannot be decided on: the answer is a 400 or 431 denial.
    pub problem: Option<RequestProblem>,
    /// The risk signals' counts to read instead of the live counters, by signal name (absent: 0):
    /// replay deciding a record again on the counts the server saw.
    pub risk_counts: Option<Box<std::collections::BTreeMap<String, u64>>>,
}

impl AccessRequest {
    /// The credential the request presents, parsed as far as its shape.
    pub fn credential(&self) -> Credential<'_> {
        match &self.credential {
            PresentedCredential::None => Credential::Missing,
            PresentedCredential::Token(token) => bearer::from_token(token),
            PresentedCredential::Authorization(value) => bearer::from_authorization(value),
            PresentedCredential::AuthorizationHeader => self
                .http
                .as_ref()
                .and_then(|h| h.headers.get("authorization"))
                .map_or(Credential::Missing, bearer::from_authorization),
            PresentedCredential::Unusable(problem) => Credential::Malformed(*problem),
            // The engine takes the established token before it reads a credential.
            PresentedCredential::Verified(_) => Credential::Missing,
        }
    }
}

impl HttpAttributes {
    /// `method`, `authority` and `target` are taken as they are when owned (no copy); the method
    /// as sent (one with lower-case letters is refused: [`Self::method_problem`]), the authority
    /// becomes the host (no port, lower case).
    pub fn new(
        method: impl Into<String>,
        authority: impl Into<String>,
        target: impl Into<String>,
        headers: Headers,
    ) -> Self {
        let (host, host_with_port) = split_authority(authority);
        Self {
            method: method.into(),
            host,
            host_with_port,
            target: target.into(),
            headers,
            pseudo_conflict: None,
        }
    }

    /// [`Self::new`] for a request as a proxy or a caller gives it: a method, authority or
    /// target left empty is read from its pseudo-header in `headers` (`:method`, `:authority`,
    /// `:path`; an authority from `host` too, as an HTTP/1 server's headers hold it), as Envoy's
    /// `Check` may carry them. Both doors read one request alike: a `Decide` whose method is only
    /// in `:method` is that method, not a default. A field that its pseudo-header (or the `host`
    /// header) contradicts is noted as [`Self::pseudo_conflict`] and refused
    /// ([`Self::method_problem`]): the upstream may read the one stepgate did not.
    pub fn with_pseudo_headers(
        method: String,
        authority: String,
        target: String,
        headers: Headers,
    ) -> Self {
        let mut conflict = None;
        let [pseudo_method, pseudo_authority, host, pseudo_path] =
            headers.get_each([":method", ":authority", "host", ":path"]);
        let mut given =
            |value: String, header: Option<&str>, same: fn(&str, &str) -> bool, why| match header {
                None => value,
                Some(header) if value.is_empty() => header.to_owned(),
                Some(header) => {
                    if !same(&value, header) {
                        conflict.get_or_insert(why);
                    }
                    value
                }
            };
        let exact = |a: &str, b: &str| a == b;
        // One host: in any case, with or without its port and trailing dot (`req.hostname`
        // beside a `host` header with the port).
        let one_host = |a: &str, b: &str| same_host(a, b);
        let method = given(
            method,
            pseudo_method,
            exact,
            "the request's method and its :method header differ: refused, the upstream may read either",
        );
        let authority = given(
            authority,
            pseudo_authority,
            one_host,
            "the request's host and its :authority header differ: refused, the upstream may read either",
        );
        let authority = given(
            authority,
            host,
            one_host,
            "the request's host and its host header differ: refused, the upstream may read either",
        );
        let target = given(
            target,
            pseudo_path,
            exact,
            "the request's path and its :path header differ: refused, the upstream may read either",
        );
        let mut http = Self::new(method, authority, target, headers);
        http.pseudo_conflict = conflict;
        http
    }

    /// The host as sent, lower-case: with its port and trailing dot, if it had them.
    pub fn host_as_sent(&self) -> &str {
        self.host_with_port.as_deref().unwrap_or(&self.host)
    }

    /// The host as a proxy routes it: as sent (`with_port`), or without its port (and an IPv6
    /// literal's brackets) but with its trailing dot.
    pub fn host_as_routed(&self, with_port: bool) -> &str {
        let sent = self.host_as_sent();
        if with_port {
            return sent;
        }
        let (start, end) = host_span(sent);
        &sent[start..end]
    }

    /// A method with a lower-case letter: the method is case-sensitive (RFC 9110 section 9.1),
    /// and `get` is another method to Go, nginx and Envoy's own route matching but `GET` to
    /// servers that upper-case it (Werkzeug). A rule matched on one reading would be the wrong
    /// rule for the other: the request is refused. Its message.
    pub fn method_problem(&self) -> Option<&'static str> {
        if let Some(conflict) = self.pseudo_conflict {
            return Some(conflict);
        }
        if self.method.is_empty() {
            // No request is served without one; a rule naming methods would not match it, and
            // one naming none would.
            return Some("an HTTP request without a method is refused: set http.method");
        }
        self.method
            .bytes()
            .any(|b| b.is_ascii_lowercase())
            .then_some("a method with lower-case letters is refused: servers differ on whether it is the upper-case one")
    }

    /// A host that URL parsers read as another: user information (`user@admin.example.com`,
    /// which HTTP/2 forbids in `:authority`) or text after an IPv6 literal's bracket other than a
    /// port (`[api.example.com]@admin.example.com`). Rules would match one host while an upstream
    /// that builds a URL from the header routes to the other.
    pub fn authority_problem(&self) -> Option<&'static str> {
        let sent = self.host_as_sent();
        (sent.contains('@') || more_than_a_port_after_literal(sent)).then_some(
            "a host with user information (@) or with more than a port after an IPv6 literal is \
             refused: a URL parser reads another host in it",
        )
    }

    /// What follows the target's first `?`, if it has one (a byte search: `str`'s search for a
    /// `char` costs more to set up than a short target takes to scan).
    fn query(&self) -> Option<&str> {
        let at = self.target.bytes().position(|b| b == b'?')?;
        Some(&self.target[at + 1..])
    }

    /// A header or query parameter through which some servers take another method or path than
    /// the request's own: `x-http-method-override` and its kin (ASP.NET Core, Express's
    /// method-override, Symfony, Laravel), `_method` in the query (Laravel, Symfony), and
    /// `x-original-url` / `x-rewrite-url` (IIS, older Symfony). A rule matched on the method or
    /// path a server ignores would be the wrong rule: the request is refused. Its message.
    ///
    /// Names are compared as such servers read them: a header's `_` as `-` (CGI-style runtimes
    /// read `x_http_method_override` as the same `HTTP_X_HTTP_METHOD_OVERRIDE`), and a query
    /// parameter's name percent-decoded, its leading spaces dropped, `.`, ` ` and `[` as `_`, cut
    /// at a NUL and in any case (PHP reads `?.method=` and `?+_method=` as `_method`).
    pub fn override_problem(&self) -> Option<&'static str> {
        const HEADERS: [(&str, &str); 5] = [
            (
                "x-http-method-override",
                "an x-http-method-override header is refused: some servers take the method from it",
            ),
            (
                "x-http-method",
                "an x-http-method header is refused: some servers take the method from it",
            ),
            (
                "x-method-override",
                "an x-method-override header is refused: some servers take the method from it",
            ),
            (
                "x-original-url",
                "an x-original-url header is refused: some servers take the path from it",
            ),
            (
                "x-rewrite-url",
                "an x-rewrite-url header is refused: some servers take the path from it",
            ),
        ];
        // Names only: a value is neither read nor checked again (the token is one of them).
        for name in self.headers.names() {
            // Every name above starts `x-` or `x_` and is 13 to 22 bytes long.
            if !(13..=22).contains(&name.len()) || !matches!(name.first(), Some(b'x' | b'X')) {
                continue;
            }
            let found = HEADERS.iter().find(|(wanted, _)| {
                wanted.len() == name.len()
                    && wanted
                        .bytes()
                        .zip(name.iter())
                        .all(|(w, &n)| w == n.to_ascii_lowercase() || (w == b'-' && n == b'_'))
            });
            if let Some((_, message)) = found {
                return Some(message);
            }
        }
        let query = self.query()?;
        query
            .split(['&', ';'])
            .map(parameter_name)
            // Only a name that spells `method` or escapes something can read as `_method`.
            .filter(|name| {
                name.contains('%')
                    || name
                        .as_bytes()
                        .windows(6)
                        .any(|w| w.eq_ignore_ascii_case(b"method"))
            })
            .any(|name| php_parameter_name(name) == "_method")
            .then_some("a _method query parameter is refused: some servers take the method from it")
    }

    /// A header sent under another spelling of one of `names` (the identity headers stepgate
    /// sets and removes): the same name with `_` for some `-`, which CGI-style
    /// runtimes (WSGI, Rack, PHP) read as the same `HTTP_X_...` variable. Envoy forwards such a
    /// name by default (`headers_with_underscores_action: ALLOW`) and removes only the spelling
    /// it is told, so `x_stepgate_subject: alice` would reach such an upstream as the identity
    /// stepgate vouches for. Returns the identity header's name.
    pub fn identity_header_spelling<'a>(
        &self,
        names: impl Iterator<Item = &'a str> + Clone,
    ) -> Option<&'a str> {
        let same = |sent: &[u8], wanted: &str| {
            sent.len() == wanted.len()
                && read_alike(sent, wanted.as_bytes())
                && !sent.eq_ignore_ascii_case(wanted.as_bytes())
        };
        // Identity header names have no `_` (the policy refuses one), so only a name sent with
        // one can spell them otherwise.
        self.headers
            .names()
            // A fold, not memchr: a name is a few bytes, and this runs for each one.
            .filter(|sent| sent.iter().fold(false, |found, &b| found | (b == b'_')))
            .find_map(|sent| names.clone().find(|wanted| same(sent, wanted)))
    }

    /// The request's header names read as stepgate's own (`x-stepgate-…` in any case, `_` for
    /// `-`), each once, as sent.
    pub fn stepgate_named_headers(&self) -> Vec<&str> {
        const PREFIX: &[u8] = b"x-stepgate-";
        let mut found: Vec<&str> = Vec::new();
        // Names only: values (the token among them) are not read.
        for name in self.headers.names() {
            if name.len() > PREFIX.len()
                && read_alike(&name[..PREFIX.len()], PREFIX)
                && let Ok(name) = std::str::from_utf8(name)
                && !found.contains(&name)
            {
                found.push(name);
            }
        }
        found
    }

    /// Whether the query string carries an RFC 6750 `access_token` parameter. Pairs are split
    /// at `;` as well as `&`: some servers read `;` as a separator, and a token one of them would
    /// find beside the header's is a second credential.
    pub fn has_query_token(&self) -> bool {
        let Some(query) = self.query() else {
            return false;
        };
        query.split(['&', ';']).any(|pair| {
            let name = parameter_name(pair);
            is_access_token_name(name)
        })
    }
}

/// Whether two header names of one length read as one to a server that ignores case and takes
/// `_` for `-` (CGI-style runtimes: WSGI, Rack, PHP).
fn read_alike(sent: &[u8], wanted: &[u8]) -> bool {
    let fold = |b: u8| match b {
        b'_' => b'-',
        b => b.to_ascii_lowercase(),
    };
    sent.iter().zip(wanted).all(|(&s, &w)| fold(s) == fold(w))
}

/// Whether a query parameter's name is RFC 6750's `access_token` as some server reads it:
/// written plainly, percent-encoded, or renamed as PHP renames names (`access.token`,
/// `access+token` and `access[token` reach a PHP application as `access_token`), or as an array
/// of it (`access_token[]`, `access_token[0]`: PHP's, Rails' and qs's `access_token`), in any case.
pub fn is_access_token_name(name: &str) -> bool {
    // Only a name that spells `token` or escapes something can read as `access_token`: the
    // others are not copied to be renamed.
    if !(name.contains('%')
        || name
            .as_bytes()
            .windows(5)
            .any(|w| w.eq_ignore_ascii_case(b"token")))
    {
        return false;
    }
    let decoded = decode_query_name(name);
    let cut = php_cut(&decoded);
    if php_renamed(cut) == "access_token" {
        return true;
    }
    // An array's name, as PHP (and Rails, and Node's `qs`) read `name[…]`: what comes before
    // the first `[` when a `]` follows it.
    cut.split_once('[')
        .is_some_and(|(base, rest)| rest.contains(']') && php_renamed(base) == "access_token")
}

/// A query parameter's name as PHP reads it, in lower case: decoded ([`decode_query_name`]),
/// leading spaces dropped, cut at a NUL, and `.`, ` ` and `[` made `_`.
fn php_parameter_name(name: &str) -> String {
    php_renamed(php_cut(&decode_query_name(name)))
}

/// A decoded name with its leading spaces dropped and cut at a NUL, as PHP reads it.
fn php_cut(decoded: &str) -> &str {
    decoded
        .trim_start_matches(' ')
        .split('\0')
        .next()
        .unwrap_or_default()
}

/// `.`, ` ` and `[` made `_`, in lower case.
fn php_renamed(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' | ' ' | '[' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Query parameters that carry a credential of their own, by name (in any case, as PHP and the
/// URL standard read it): an OAuth authorization code or its verifier, a refresh, ID or
/// exchanged token, a client secret or assertion, a SAML response, a password, an API key, a
/// presigned URL's signature. Decision records write their values as `REDACTED`
/// ([`is_credential_name`]).
const CREDENTIAL_NAMES: [&str; 33] = [
    "access-token",
    "auth_token",
    "oauth_token",
    "private_token",
    "jwt",
    "session",
    "code",
    "code_verifier",
    "refresh_token",
    "id_token",
    "subject_token",
    "actor_token",
    "client_secret",
    "client_assertion",
    "assertion",
    "samlresponse",
    "password",
    "passwd",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "key",
    "token",
    "secret",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "auth",
];

// What [`is_credential_name`]'s comparison relies on.
const _: () = {
    let mut i = 0;
    while i < CREDENTIAL_NAMES.len() {
        let name = CREDENTIAL_NAMES[i].as_bytes();
        let mut j = 0;
        while j < name.len() {
            let b = name[j];
            assert!(b.is_ascii() && !b.is_ascii_uppercase() && b != b'.' && b != b' ' && b != b'[');
            j += 1;
        }
        i += 1;
    }
};

/// Whether a query parameter's name is RFC 6750's `access_token` ([`is_access_token_name`]) or
/// another credential's ([`CREDENTIAL_NAMES`]), read as the URL standard and PHP read it:
/// percent-decoded, in any case, renamed (`client.secret`, `+code`), or an array of it
/// (`refresh_token[]`, `api_key[0]`).
pub fn is_credential_name(name: &str) -> bool {
    // A plain name (most are) reads as written, in any case: nothing to decode, cut or rename.
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return name.eq_ignore_ascii_case("access_token") || renamed_is_credential(name);
    }
    if is_access_token_name(name) {
        return true;
    }
    let decoded = decode_query_name(name);
    let cut = php_cut(&decoded);
    // An array's name (`refresh_token[]`), or a nested key (`user[password]`, which Rack and PHP
    // read as a value of `user`): each part between brackets is a name too.
    renamed_is_credential(cut)
        || cut
            .split(['[', ']'])
            .filter(|part| !part.is_empty())
            .any(renamed_is_credential)
}

/// Whether `name`, renamed as PHP renames it ([`php_renamed`]), is one of [`CREDENTIAL_NAMES`]:
/// compared byte for byte without building it. Every byte it maps stays one byte, and the
/// credentials are lower-case ASCII without `.`, ` ` or `[` (so the name in lower case alone never
/// matches where the renamed one does not).
fn renamed_is_credential(name: &str) -> bool {
    CREDENTIAL_NAMES.iter().any(|credential| {
        name.len() == credential.len()
            && name.bytes().zip(credential.bytes()).all(|(b, c)| {
                let renamed = match b {
                    b'.' | b' ' | b'[' => b'_',
                    b => b.to_ascii_lowercase(),
                };
                renamed == c
            })
    })
}

/// A query parameter's name decoded as the URL standard and PHP decode it (`form_urlencoded`):
/// `%XX` escapes, `+` a space, a broken escape kept as written, bytes that are not UTF-8
/// replaced. `name` holds no `&`, `;` or `=` (it was cut at them).
fn decode_query_name(name: &str) -> Cow<'_, str> {
    form_urlencoded::parse(name.as_bytes())
        .next()
        .map_or(Cow::Borrowed(""), |(name, _)| name)
}

/// The host, lower-case, without its port or a trailing dot (`Admin.Example.com.:443` is
/// `admin.example.com`), and, when it had either, the whole authority in lower case: a resolver
/// and most servers read both as one host, but Envoy picks its virtual host with them.
fn split_authority(authority: impl Into<String>) -> (String, Option<Box<str>>) {
    let mut host = authority.into();
    let (start, mut end) = host_span(&host);
    if host[start..end].ends_with('.') {
        end -= 1;
    }
    // Past the host: an IPv6 literal's closing bracket, then what was cut.
    let kept = end + usize::from(start == 1 && host[end..].starts_with(']'));
    let with_port = (kept < host.len()).then(|| host.to_ascii_lowercase().into_boxed_str());
    // In place: the authority's own buffer becomes the host.
    host.truncate(end);
    host.drain(..start);
    host.make_ascii_lowercase();
    (host, with_port)
}

/// The most `host` parameters a `Forwarded` header may hold before it is refused whole: a real
/// one holds one per proxy. It bounds [`forwarded_hosts`], which reads on from each.
pub const MAX_FORWARDED_HOSTS: usize = 16;

/// The longest host a `Forwarded` header may name (a DNS name is at most 253 bytes): one read
/// longer refuses the header, and no reading looks further than this past its `=`.
pub const MAX_FORWARDED_HOST_BYTES: usize = 512;

/// The first [`MAX_FORWARDED_HOST_BYTES`] and a byte of `raw` (at a character boundary), and
/// whether that left some out.
fn forwarded_window(raw: &str) -> (&str, bool) {
    let mut end = MAX_FORWARDED_HOST_BYTES + 1;
    if raw.len() <= end {
        return (raw, false);
    }
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    (&raw[..end], true)
}

/// The hosts a `Forwarded` header (RFC 7239) may be read to name, by any of its readers: `None`
/// when it holds more than [`MAX_FORWARDED_HOSTS`] host parameters by one reading (refused, as
/// naming another host). Every `host` in any case (and with `ſ`, U+017F, for its `s`, which
/// Unicode case folding matches), then spaces and `=`, anywhere in the value, quoted text
/// included; from there and from past the spaces that follow, each reading of the value, with
/// surrounding spaces (Ruby's `strip`: NUL, tab, LF, VT, FF, CR and space) left out, empty ones
/// skipped:
/// - up to the next `;`, `,` or `"`, past an opening quote (Spring's `ForwardedHeaderUtils` and
///   Quarkus: `(?i:host)="?([^;,"]+)"?`; Rack before 3.2, which splits at `;` and `,` first);
/// - unquoted, up to the next `;` or `,` (a parser in Rack's manner);
/// - a quoted value to its closing quote, backslash escapes undone (RFC 7239's `quoted-string`);
///   without one, also up to its last escape.
///
/// The value is also read with a line feed as a `;` (Rack); pair by pair as Rack 3.2 reads it
/// (split at `;`, `,` and line feeds, each pair at `=`, the pieces stripped and joined again,
/// one quote off each end); and pair by pair with every quote dropped, escapes undone or not
/// (Jetty's `QuotedCSVParser`, @angular/ssr), which reads `"host"=…` and `ho"st"=…` as `host=`.
/// A host rule compared with every one of them is compared with the host an upstream trusting the
/// header routes on. A reading longer than [`MAX_FORWARDED_HOST_BYTES`] refuses the header too, so
/// that no reading looks further: at most 16 host parameters, each read within 513 bytes, by each
/// of five passes over the value.
pub fn forwarded_hosts(value: &str) -> Option<Vec<String>> {
    let mut hosts = Vec::new();
    forwarded_readings(value, &mut hosts)?;
    // Rack reads a line feed as a `;`.
    if value.contains('\n') {
        forwarded_readings(&value.replace('\n', ";"), &mut hosts)?;
    }
    // Rack 3.2: each `;`- then `,`-separated pair split at `=` (empty pieces at its end dropped),
    // the pieces stripped and joined again, then `host="?([^"]+)"?` matched whole.
    pair_readings(value, &[';', ',', '\n'], &mut hosts, |value| {
        let pieces: Vec<&str> = value.split('=').collect();
        let kept = pieces
            .iter()
            .rposition(|piece| !piece.is_empty())
            .map_or(0, |i| i + 1);
        let joined: Vec<&str> = pieces[..kept]
            .iter()
            .map(|p| p.trim_matches(forwarded_space))
            .collect();
        let joined = joined.join("=");
        let value = joined.strip_prefix('"').unwrap_or(&joined);
        value.strip_suffix('"').unwrap_or(value).to_owned()
    })?;
    // Jetty (`QuotedCSVParser`) and @angular/ssr drop quotes wherever they stand, a parameter's
    // name included (`"host"=…`, `ho"st"=…`), Jetty undoing escapes: each element's `host=`.
    if value.contains(['"', '\\']) {
        for undo_escapes in [true, false] {
            let mut view = String::with_capacity(value.len());
            let mut chars = value.chars();
            while let Some(c) = chars.next() {
                match c {
                    '"' => {}
                    '\\' if undo_escapes => view.extend(chars.next()),
                    c => view.push(c),
                }
            }
            pair_readings(&view, &[';', ','], &mut hosts, str::to_owned)?;
        }
    }
    Some(hosts)
}

/// Each pair of `value` (between `separators`) named `host` (stripped, any case): its value as
/// `read` makes it, stripped, added to `hosts`. `None` past [`MAX_FORWARDED_HOSTS`] such pairs.
fn pair_readings(
    value: &str,
    separators: &[char],
    hosts: &mut Vec<String>,
    read: impl Fn(&str) -> String,
) -> Option<()> {
    if !value.contains('=') {
        return Some(());
    }
    let mut found = 0;
    for pair in value.split(separators) {
        let Some((name, rest)) = pair.split_once('=') else {
            continue;
        };
        if !name
            .trim_matches(forwarded_space)
            .eq_ignore_ascii_case("host")
        {
            continue;
        }
        found += 1;
        if found > MAX_FORWARDED_HOSTS || rest.len() > MAX_FORWARDED_HOST_BYTES {
            return None;
        }
        add_forwarded_host(hosts, &read(rest));
    }
    Some(())
}

/// `host` stripped, added to `hosts` unless empty or there already.
fn add_forwarded_host(hosts: &mut Vec<String>, host: &str) {
    let host = host.trim_matches(forwarded_space);
    if !host.is_empty() && !hosts.iter().any(|h| h == host) {
        hosts.push(host.to_owned());
    }
}

/// Ruby's `String#strip` set: NUL, tab, LF, VT, FF, CR and space.
fn forwarded_space(c: char) -> bool {
    matches!(c, '\0' | '\t' | '\n' | '\x0b' | '\x0c' | '\r' | ' ')
}

/// [`forwarded_hosts`] of `value` as it stands, added to `hosts`; `None` past the bound.
fn forwarded_readings(value: &str, hosts: &mut Vec<String>) -> Option<()> {
    let space = forwarded_space;
    let bytes = value.as_bytes();
    let mut found = 0;
    let mut i = 0;
    while i < bytes.len() {
        let Some(name) = host_name_at(bytes, i) else {
            i += 1;
            continue;
        };
        // The name is ASCII but for `ſ`: `i + name` is a character boundary.
        let after = value[i + name..].trim_start_matches(space);
        i += 1;
        let Some(raw) = after.strip_prefix('=') else {
            continue;
        };
        found += 1;
        if found > MAX_FORWARDED_HOSTS {
            return None;
        }
        let mut push = |host: &str| add_forwarded_host(hosts, host);
        // Read as it follows the `=`, and past the spaces there (Rack 3.1 looks for a quote at
        // once; others trim first).
        let trimmed = raw.trim_start_matches(space);
        for raw in [raw, trimmed]
            .into_iter()
            .take(1 + usize::from(trimmed != raw))
        {
            // A reading that runs past the window is a host longer than any: refused.
            let (raw, clipped) = forwarded_window(raw);
            let unquoted = raw.strip_prefix('"').unwrap_or(raw);
            let end = unquoted.find([';', ',', '"']);
            if clipped && end.is_none() {
                return None;
            }
            push(&unquoted[..end.unwrap_or(unquoted.len())]);
            let Some(quoted) = raw.strip_prefix('"') else {
                let end = raw.find([';', ',']);
                if clipped && end.is_none() {
                    return None;
                }
                push(&raw[..end.unwrap_or(raw.len())]);
                continue;
            };
            let mut text = String::new();
            // Where the text stood after its last escape: Rack 3.1 drops what follows it when
            // no quote closes the value.
            let (mut escaped, mut closed) = (0, false);
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => {
                        text.extend(chars.next());
                        escaped = text.len();
                    }
                    c => text.push(c),
                }
            }
            if clipped && !closed {
                return None;
            }
            push(&text);
            if !closed {
                push(&text[..escaped]);
            }
        }
    }
    Some(())
}

/// The length of a parameter name `host` at `at` (any case; `ſ` for `s`), if there is one.
fn host_name_at(bytes: &[u8], at: usize) -> Option<usize> {
    let rest = bytes.get(at..)?;
    let [h, o, rest @ ..] = rest else {
        return None;
    };
    if !h.eq_ignore_ascii_case(&b'h') || !o.eq_ignore_ascii_case(&b'o') {
        return None;
    }
    let (s, rest) = match rest {
        [s, rest @ ..] if s.eq_ignore_ascii_case(&b's') => (1, rest),
        [0xC5, 0xBF, rest @ ..] => (2, rest),
        _ => return None,
    };
    rest.first()
        .filter(|t| t.eq_ignore_ascii_case(&b't'))
        .map(|_| 3 + s)
}

/// Whether an authority holds more than a port after its IPv6 literal's closing bracket
/// (`[api.example.com]@admin.example.com`, which a URL parser reads as another host).
fn more_than_a_port_after_literal(authority: &str) -> bool {
    authority
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(_, after)| {
            !after.is_empty()
                && !after
                    .strip_prefix(':')
                    .is_some_and(|port| port.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Whether two authorities name one host: in any case, without their ports and trailing dots.
pub fn same_host(a: &str, b: &str) -> bool {
    let host = |authority: &str| {
        // After an IPv6 literal's bracket, nothing but a port: anything else
        // (`[api.example.com]@admin.example.com`, another host to a URL parser) is compared whole.
        let (start, end) = if more_than_a_port_after_literal(authority) {
            (0, authority.len())
        } else {
            host_span(authority)
        };
        authority[start..end]
            .trim_end_matches('.')
            .to_ascii_lowercase()
    };
    host(a) == host(b)
}

/// Where the host of an authority starts and ends, its port and an IPv6 literal's brackets left
/// out (a trailing dot kept).
fn host_span(authority: &str) -> (usize, usize) {
    if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: the brackets' content.
        return (1, 1 + rest.find(']').unwrap_or(rest.len()));
    }
    match authority.rsplit_once(':') {
        // One `:` only: more is an IPv6 literal without brackets (a `Decide` caller's), not a
        // port.
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            (0, h.len())
        }
        _ => (0, authority.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's address is spelled one way whatever way it came: an IPv4 address kept as given
    /// is the formatting of what it parses to, and a text that is not one (leading zeros, a
    /// port, spaces) is kept as it is.
    mod peer_addresses {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #[test]
            fn an_ipv4_address_is_kept_only_in_its_one_spelling(
                octets in any::<[u8; 4]>(),
                pad in 0usize..4,
                zeros in 0usize..3,
                suffix in prop::sample::select(vec!["", ":80", " ", "."]),
            ) {
                let mut parts: Vec<String> = octets.iter().map(u8::to_string).collect();
                parts[pad] = format!("{}{}", "0".repeat(zeros), parts[pad]);
                let text = format!("{}{suffix}", parts.join("."));
                let peer = Peer::new(&text, String::new());
                match text.parse::<std::net::IpAddr>() {
                    Ok(ip) => prop_assert_eq!(&peer.address, &ip.to_canonical().to_string()),
                    Err(_) => prop_assert_eq!(&peer.address, &text),
                }
            }
        }

        #[test]
        fn a_parameter_name_is_what_comes_before_the_first_equals_sign() {
            for pair in [
                "", "=", "a", "a=", "=b", "a=b=c", "é=ü", "a%3D=b", "tok en=1",
            ] {
                assert_eq!(
                    parameter_name(pair),
                    pair.split('=').next().unwrap(),
                    "{pair:?}"
                );
            }
        }

        #[test]
        fn ipv6_and_mapped_addresses_are_written_as_rfc_5952_does() {
            assert_eq!(
                Peer::new("::ffff:192.0.2.7", String::new()).address,
                "192.0.2.7"
            );
            assert_eq!(
                Peer::new("2001:DB8:0::1", String::new()).address,
                "2001:db8::1"
            );
            assert_eq!(Peer::new("192.0.2.7", String::new()).address, "192.0.2.7");
            assert_eq!(Peer::new("unix:/sock", String::new()).address, "unix:/sock");
        }
    }

    /// [`is_credential_name`]'s comparison against the names built as PHP builds them: renamed
    /// ([`php_renamed`]) or lower-cased, on names made from the credentials by the changes a
    /// client could make (case, `.`, ` ` or `[` for `_`, escapes, arrays, nesting) and on others.
    mod credential_names {
        use proptest::prelude::*;

        use super::*;

        fn built(name: &str) -> bool {
            if is_access_token_name(name) {
                return true;
            }
            let decoded = decode_query_name(name);
            let cut = php_cut(&decoded);
            let named = |name: &str| {
                let plain = name.to_ascii_lowercase();
                let renamed = php_renamed(name);
                CREDENTIAL_NAMES
                    .iter()
                    .any(|credential| plain == *credential || renamed == *credential)
            };
            named(cut)
                || cut
                    .split(['[', ']'])
                    .filter(|part| !part.is_empty())
                    .any(named)
        }

        fn changed(name: &str, changes: &[u8]) -> String {
            let mut out = String::new();
            for (c, change) in name.chars().zip(changes.iter().cycle()) {
                match change % 8 {
                    0 => out.push(c.to_ascii_uppercase()),
                    1 if c == '_' => out.push('.'),
                    2 if c == '_' => out.push(' '),
                    3 if c == '_' => out.push('['),
                    4 => out.push_str(&format!("%{:02X}", u32::from(c))),
                    5 => out.push('\u{e9}'),
                    _ => out.push(c),
                }
            }
            out
        }

        proptest! {
            #[test]
            fn as_built(
                credential in 0..CREDENTIAL_NAMES.len(),
                changes in proptest::collection::vec(any::<u8>(), 1..8),
                shape in 0..4u8,
                other in "[a-zA-Z0-9_.\\[\\] %+-]{0,12}",
            ) {
                let name = changed(CREDENTIAL_NAMES[credential], &changes);
                let name = match shape {
                    0 => name,
                    1 => format!("{name}[]"),
                    2 => format!("user[{name}]"),
                    _ => format!("{other}{name}"),
                };
                prop_assert_eq!(is_credential_name(&name), built(&name), "{}", name);
                prop_assert_eq!(is_credential_name(&other), built(&other), "{}", other);
            }
        }
    }

    #[test]
    fn a_message_quotes_at_most_the_start_of_a_request_chosen_name() {
        let name = format!("A{}", "\u{1}".repeat(48_000));
        let message = RequestProblem::DuplicateHeader(name).describe();
        assert!(message.len() < 500, "{} bytes", message.len());
        assert!(
            message.contains("\"A\\u{1}") && message.contains("…"),
            "{message}"
        );
        let short = RequestProblem::DuplicateHeader("X-Trace".into()).describe();
        assert_eq!(
            short,
            "the header \"X-Trace\" is given twice, in different case"
        );
        let operation = RequestProblem::InvalidOperation.describe();
        assert!(operation.contains("256 bytes"), "{operation}");
        assert!(is_valid_operation("payments.wire_transfer"));
        assert!(is_valid_operation(&"é".repeat(128)));
        assert!(!is_valid_operation(&"é".repeat(129)));
        assert!(!is_valid_operation("pay\nments"));
        assert!(!is_valid_operation("pay\u{85}ments"));
    }

    fn host_without_port(authority: &str) -> String {
        split_authority(authority).0
    }

    #[test]
    fn host_loses_port_and_case() {
        assert_eq!(host_without_port("API.example.com:8443"), "api.example.com");
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("Admin.Example.com."), "admin.example.com");
        assert_eq!(
            host_without_port("admin.example.com.:8443"),
            "admin.example.com"
        );
    }

    /// The authority as sent is kept (in lower case) exactly when something was cut from it.
    #[test]
    fn the_host_as_sent_is_kept_when_it_had_a_port_or_a_dot() {
        for (authority, with_port) in [
            ("API.example.com:8443", Some("api.example.com:8443")),
            ("Admin.Example.com.", Some("admin.example.com.")),
            ("a.example.com.:443", Some("a.example.com.:443")),
            ("[::1]:80", Some("[::1]:80")),
            ("host:", Some("host:")),
            ("API.example.com", None),
            ("[::1]", None),
            ("[::1", None),
            ("host:abc", None),
            ("", None),
        ] {
            let (host, kept) = split_authority(authority);
            assert_eq!(kept.as_deref(), with_port, "{authority}");
            let http = HttpAttributes::new("GET", authority, "/", Headers::default());
            assert_eq!(http.host, host);
            assert_eq!(
                http.host_as_sent(),
                with_port.unwrap_or(&host),
                "{authority}"
            );
        }
    }

    #[test]
    fn odd_authorities_keep_what_they_hold() {
        assert_eq!(host_without_port("[::1]"), "::1");
        assert_eq!(host_without_port("[::1"), "::1");
        assert_eq!(host_without_port("host:"), "host");
        assert_eq!(host_without_port("host:abc"), "host:abc");
        assert_eq!(host_without_port("."), "");
        assert_eq!(host_without_port(""), "");
        assert_eq!(host_without_port("[Fe80::1.]:9"), "fe80::1");
        // Without brackets (a `Decide` caller's), an IPv6 literal has no port.
        assert_eq!(host_without_port("::1"), "::1");
        assert_eq!(host_without_port("2001:DB8::1"), "2001:db8::1");
    }

    /// The host as the first version read it, with new strings rather than in place.
    fn host_by_slicing(authority: &str) -> String {
        let host = if let Some(rest) = authority.strip_prefix('[') {
            rest.split(']').next().unwrap_or(rest)
        } else {
            authority.rsplit_once(':').map_or(authority, |(h, port)| {
                if !h.contains(':') && port.chars().all(|c| c.is_ascii_digit()) {
                    h
                } else {
                    authority
                }
            })
        };
        host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
    }

    proptest::proptest! {
        #[test]
        fn the_host_cut_in_place_is_the_host_sliced(
            authority in "[\\[\\]:.0-9a-zA-Z\u{e9}\u{3b1}]{0,16}"
        ) {
            proptest::prop_assert_eq!(
                host_without_port(authority.as_str()),
                host_by_slicing(&authority)
            );
        }
    }

    #[test]
    fn finds_access_token_query_parameter() {
        let http = |t: &str| HttpAttributes::new("GET", "h", t, Headers::default());
        assert!(http("/a?x=1&access_token=abc").has_query_token());
        assert!(http("/a?x=1;access_token=abc").has_query_token());
        assert!(!http("/a?my_access_token=abc").has_query_token());
        assert!(http("/a?%61ccess_token=abc").has_query_token());
        assert!(http("/a?access%5Ftoken=abc").has_query_token());
        // As PHP renames names: `$_GET['access_token']` to the application.
        for query in [
            "access.token",
            "access+token",
            "access%20token",
            "access[token",
            "+access_token",
            "ACCESS_TOKEN",
            // An array of it: PHP's `$_GET['access_token'][0]`, Rails' and qs's too.
            "access_token[]",
            "access_token[0]",
            "access_token%5B%5D",
            "access.token[x]",
        ] {
            assert!(
                http(&format!("/a?{query}=abc")).has_query_token(),
                "{query}"
            );
        }
        assert!(!http("/a?access__token=abc&accesstoken=1").has_query_token());
        assert!(!http("/a?access_tokens[]=abc&x[access_token]=1").has_query_token());
        assert!(!http("/a").has_query_token());
    }
}
