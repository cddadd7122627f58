//! Envoy ext_authz v3 `Check`: a thin adapter from `CheckRequest` (decoded as the fields it reads,
//! see [`check_request`](super::check_request)) to `AccessRequest`, and from `Decision` back to a
//! `CheckResponse` (encoded by [`CheckAnswer`]).
//!
//! Every policy outcome, denials included, is an OK gRPC response: a gRPC error tells Envoy that
//! the authorizer failed, and Envoy then applies `failure_mode_allow`. Denials carry their HTTP
//! status explicitly (Envoy would send 403 for an unset one).
//!
//! The call is served without tonic's service machinery (server/calls.rs routes it here): its
//! body is read by `grpc_message::UnaryReader`, the message through stepgate's narrower view of
//! `CheckRequest`, and the answer leaves as the frame [`CheckAnswer`] encoded straight from the
//! decision.

use std::{
    borrow::Cow,
    collections::HashMap,
    future::Future,
    pin::{Pin, pin},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use opentelemetry::trace::SpanContext;
use tonic::Status;

use super::{
    answer::CheckAnswer,
    authorizer::{Authorizer, WorkerHandle},
    calls::{self, CallBody},
    catch_panic::{catch_panic, catch_panic_now},
    check_request::CheckRequest,
    grpc_message::{self, Unary, UnaryReader},
};
use crate::{
    decision::{Decision, Reason},
    identity::{ClientCertificate, CredentialProblem},
    request::{AccessRequest, Door, HttpAttributes, Peer, PresentedCredential, RequestProblem},
    telemetry::traces,
};

pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The `envoy.service.auth.v3.Authorization` service's one method, `Check`, as one worker
/// serves it (see [`WorkerHandle`]).
#[derive(Debug, Clone)]
pub struct ExtAuthz {
    authorizer: WorkerHandle,
    /// Largest `CheckRequest` message read; a larger one is answered 413 without being read.
    max_message_bytes: usize,
    /// What the bodies still arriving may hold, shared by every call of the process.
    budget: Arc<grpc_message::Budget>,
}

impl ExtAuthz {
    pub fn new(
        authorizer: Arc<Authorizer>,
        max_message_bytes: usize,
        budget: Arc<grpc_message::Budget>,
    ) -> Self {
        Self {
            authorizer: WorkerHandle::new(authorizer),
            max_message_bytes,
            budget,
        }
    }

    /// [`ExtAuthz::call`], answered by `answer_by` whatever happens: a call not decided by then
    /// (its body still arriving, a wait for an unknown key) is a `503 deadline_exceeded` denial.
    /// The caller sets it a little before the call's deadline, so that Envoy reads a denial, not
    /// a timeout its `failure_mode_allow` could let through.
    ///
    /// `started`: when the call arrived (the time its decision is logged with, and `answer_by`
    /// counts from).
    pub async fn call_by<B>(
        self,
        request: http::Request<B>,
        started: Instant,
        answer_by: Duration,
    ) -> http::Response<CallBody>
    where
        B: RequestBody,
    {
        // The decision has a guard of its own; this one covers reading the call and refusing it,
        // so that even a bug there is answered with a denial rather than a reset stream.
        let answer = pin!(self.answer(request, started));
        let by = tokio::time::Instant::from_std(started) + answer_by;
        match tokio::time::timeout_at(by, catch_panic(answer)).await {
            Ok(Ok(response)) => response,
            Ok(Err(panic)) => {
                let (decision, policy) = self.authorizer.failed(Door::Check, started, &panic);
                calls::unary(CheckAnswer::new(decision, &policy).into_frame())
            }
            Err(_) => self.refuse(
                started,
                503,
                Reason::DeadlineExceeded,
                "stepgate could not decide before the call's deadline",
            ),
        }
    }

    /// Reads, decides and answers one `Check` call. Whatever the request holds, the answer is a
    /// decision: a body that is not one uncompressed `CheckRequest` is a `400 malformed_request`
    /// denial and one over `--max-message-bytes` a `413 request_too_large` (a gRPC error would
    /// let Envoy's `failure_mode_allow` through). Only a stream the client abandoned mid-body ends
    /// with a gRPC error, which nobody reads.
    pub async fn call<B>(self, request: http::Request<B>) -> http::Response<CallBody>
    where
        B: RequestBody,
    {
        self.answer(request, Instant::now()).await
    }

    async fn answer<B>(
        &self,
        request: http::Request<B>,
        started: Instant,
    ) -> http::Response<CallBody>
    where
        B: RequestBody,
    {
        let (parts, body) = request.into_parts();
        let compressed = compressed(&parts.headers);
        // Envoy puts its ext_authz span in the call's gRPC metadata (its HTTP/2 headers); the
        // CheckRequest's headers hold the client's own (an older hop), the fallback. Read before
        // the body, so that the call's future does not keep the headers while it waits for it.
        let from_metadata =
            traces::parent(|name| parts.headers.get(name).and_then(|v| v.to_str().ok()));
        drop(parts);
        let read = if compressed {
            Unary::Malformed(grpc_message::COMPRESSED)
        } else {
            let reader = UnaryReader::with_budget(self.max_message_bytes, Arc::clone(&self.budget));
            match read_unary(body, reader).await {
                Ok(read) => read,
                Err(error) => {
                    tracing::debug!(%error, "a Check call's body failed before it ended");
                    return calls::status(Status::cancelled("the request body failed"));
                }
            }
        };
        // Decided in one go, outside this future's state; only a decision that waits for an
        // unknown key goes on in a future of its own.
        let wait = match self.decide_read(read, from_metadata, started) {
            Ok(answered) => return answered,
            Err(wait) => wait,
        };
        wait.await
    }

    /// Decides a call whose body is read: its answer, or a future that waits for an unknown key
    /// and decides again.
    fn decide_read(
        &self,
        read: Unary,
        from_metadata: Option<SpanContext>,
        started: Instant,
    ) -> Result<http::Response<CallBody>, KeyWaitAnswer<'_>> {
        let message = match read {
            Unary::Message(message) => message,
            Unary::TooLarge(_) => {
                return Ok(self.refuse(
                    started,
                    413,
                    Reason::RequestTooLarge,
                    "the CheckRequest is larger than stepgate reads (--max-message-bytes)",
                ));
            }
            Unary::Malformed(why) => {
                return Ok(self.refuse(started, 400, Reason::MalformedRequest, why));
            }
            Unary::Overloaded => {
                return Ok(self.refuse(
                    started,
                    503,
                    Reason::Overloaded,
                    grpc_message::OVER_BUDGET,
                ));
            }
        };
        // One policy reads the request and decides it.
        let policy = self.authorizer.snapshot();
        let check = match CheckRequest::decode(message, policy.header_limits) {
            Ok(check) => check,
            Err(error) => {
                tracing::debug!(%error, "a Check call's message is not a CheckRequest");
                return Ok(self.refuse(
                    started,
                    400,
                    Reason::MalformedRequest,
                    "the Check call's message is not a well-formed CheckRequest",
                ));
            }
        };
        let authorizer = &self.authorizer;
        let failed = move |panic: String| {
            let (decision, policy) = authorizer.failed(Door::Check, started, &panic);
            calls::unary(CheckAnswer::new(decision, &policy).into_frame())
        };
        let decided = catch_panic_now(|| {
            let access = access_request(check);
            let parent = from_metadata.or_else(|| {
                let headers = &access.http.as_ref()?.headers;
                traces::parent(|name| headers.get(name))
            });
            match authorizer.decide_now_under(policy, &access, Door::Check, parent) {
                Ok((decision, policy)) => Ok(CheckAnswer::new(decision, &policy).into_frame()),
                Err(wait) => Err(Box::pin(async move {
                    let answer = catch_panic(pin!(async {
                        let (decision, policy) = authorizer.decide_after_key(&access, wait).await;
                        CheckAnswer::new(decision, &policy).into_frame()
                    }))
                    .await;
                    answer.map_or_else(failed, calls::unary)
                }) as KeyWaitAnswer<'_>),
            }
        });
        match decided {
            Ok(Ok(frame)) => Ok(calls::unary(frame)),
            Ok(Err(wait)) => Err(wait),
            Err(panic) => Ok(failed(panic)),
        }
    }

    /// The answer to a `Check` from a caller not allowed to call it (`--check-from`,
    /// `--check-client-san`): `403 caller_not_allowed`, its request unread.
    pub fn caller_not_allowed(
        &self,
        remote: Option<std::net::SocketAddr>,
    ) -> http::Response<CallBody> {
        super::check_callers::warn_refused(remote);
        self.refuse(
            Instant::now(),
            403,
            Reason::CallerNotAllowed,
            "this caller may not call Check (--check-from, --check-client-san)",
        )
    }

    /// A denial of a call that could not be decided, logged and counted like any decision.
    fn refuse(
        &self,
        started: Instant,
        http_status: u16,
        reason: Reason,
        message: &'static str,
    ) -> http::Response<CallBody> {
        let refusal = Decision::refusal(http_status, reason, message);
        let (decision, policy) = self.authorizer.refused(Door::Check, started, refusal);
        calls::unary(CheckAnswer::new(decision, &policy).into_frame())
    }
}

/// The rest of a `Check` whose decision waits for an unknown key.
type KeyWaitAnswer<'a> = Pin<Box<dyn Future<Output = http::Response<CallBody>> + Send + 'a>>;

/// The request names a message encoding other than `identity` (stepgate offers none).
pub(crate) fn compressed(headers: &http::HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_some_and(|encoding| encoding.as_bytes() != b"identity")
}

/// A `Check` call's request body: hyper's in the server, any in tests.
pub trait RequestBody: http_body::Body<Data = Bytes, Error: std::fmt::Display> {}

impl<B: http_body::Body<Data = Bytes, Error: std::fmt::Display>> RequestBody for B {}

/// Reads `body` as a unary call's, stopping at the first refusal. `Err`: the body itself failed
/// (the client reset the stream).
pub(crate) async fn read_unary<B>(body: B, mut reader: UnaryReader) -> Result<Unary, B::Error>
where
    B: http_body::Body<Data = Bytes>,
{
    let mut body = pin!(body);
    while let Some(frame) = body.frame().await {
        // Trailers, which gRPC clients do not send on requests, are ignored.
        if let Ok(data) = frame?.into_data()
            && let Some(refusal) = reader.push(data)
        {
            return Ok(refusal);
        }
    }
    Ok(reader.finish())
}

/// Reads a `CheckRequest` into the engine's view. The headers stay where they were decoded
/// (see [`Headers`]); with Envoy's `encode_raw_headers`, they come from `header_map` instead (raw
/// bytes, a repeated name as separate entries, joined here with `,`). More than one
/// `authorization` entry, in either field or in any case, makes the credential unusable rather
/// than picking one.
pub fn access_request(check: CheckRequest) -> AccessRequest {
    let source = check.source.is_some().then(|| {
        Peer::new(
            check.source_address().unwrap_or_default(),
            check.source_principal().unwrap_or_default().to_owned(),
        )
    });
    let client_certificate = check
        .source_certificate_bytes()
        .map(ClientCertificate::UrlEncodedPem);
    let context: serde_json::Map<String, serde_json::Value> = check
        .context_extensions()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
        .collect();
    let operation = context
        .get("operation")
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    let mut credential = PresentedCredential::None;
    let mut proxy_header_count = None;
    let raw_header_count = check.raw_header_count();
    let (method, host, path) = (
        check.method().to_owned(),
        check.host().to_owned(),
        check.path().to_owned(),
    );
    let raw_headers = (raw_header_count > 0).then(|| with_raw_headers(&check));
    // Envoy shows a path byte that is not UTF-8 as `!` in `path` (and in `headers`) but forwards
    // the byte itself upstream: the path stepgate would decide is not the one served. Only the
    // raw `:path` tells; a request whose pseudo-header bytes are not text is not decided.
    let mut problem = check.problem;
    if let Some(field) = raw_headers.as_ref().and_then(|raw| raw.pseudo_not_utf8) {
        problem.get_or_insert(RequestProblem::NotUtf8(field));
    }
    let http = check.http.map(|h| {
        let (headers, authorization_entries) = match raw_headers {
            None => {
                proxy_header_count = Some(h.headers.len());
                let count = h.headers.count("authorization");
                (h.headers, count)
            }
            Some(raw) => {
                proxy_header_count = Some(raw_header_count);
                if raw.authorization_not_utf8 {
                    credential = PresentedCredential::Unusable(CredentialProblem::InvalidBytes);
                }
                (raw.entries.into_iter().collect(), raw.authorization_entries)
            }
        };
        if authorization_entries > 1 {
            credential = PresentedCredential::Unusable(CredentialProblem::MultipleCredentials);
        } else if authorization_entries == 1 && credential == PresentedCredential::None {
            credential = PresentedCredential::AuthorizationHeader;
        }
        HttpAttributes::with_pseudo_headers(method, host, path, headers)
    });
    AccessRequest {
        credential,
        operation,
        http,
        attributes: serde_json::Map::new(),
        context,
        source,
        client_certificate,
        proxy_header_count,
        explain: false,
        problem,
        risk_counts: None,
    }
}

/// The headers when `header_map` is set: each name once (lower case), with the `headers` map's
/// value (if a client sent both fields; Envoy sends one) and then `header_map`'s values in the
/// order given, joined with `,`. Raw bytes that are not UTF-8 are replaced (U+FFFD). Built with
/// one hash index, so that no input makes it quadratic.
struct RawHeaders {
    entries: Vec<(String, String)>,
    /// `authorization` entries in both fields.
    authorization_entries: usize,
    authorization_not_utf8: bool,
    /// The first pseudo-header whose raw bytes are not UTF-8 (as the field it stands for).
    pseudo_not_utf8: Option<&'static str>,
}

fn with_raw_headers(check: &CheckRequest) -> RawHeaders {
    let mut index: HashMap<String, usize, foldhash::fast::RandomState> = HashMap::default();
    let mut joined = RawHeaders {
        entries: Vec::with_capacity(check.raw_header_count()),
        authorization_entries: 0,
        authorization_not_utf8: false,
        pseudo_not_utf8: None,
    };
    let map = check.http.iter().flat_map(|h| h.headers.iter());
    for (name, value) in map {
        joined.authorization_entries += usize::from(name == "authorization");
        match index.get(name) {
            // The map's own repeated key: the last value, as in a protobuf map.
            Some(&at) => value.clone_into(&mut joined.entries[at].1),
            None => {
                index.insert(name.to_owned(), joined.entries.len());
                joined.entries.push((name.to_owned(), value.to_owned()));
            }
        }
    }
    for raw in check.raw_headers() {
        let name = raw.key.to_ascii_lowercase();
        let value = if raw.raw_value.is_empty() {
            Cow::Borrowed(raw.value)
        } else {
            String::from_utf8_lossy(raw.raw_value)
        };
        let not_utf8 = || std::str::from_utf8(raw.raw_value).is_err();
        match name.as_str() {
            "authorization" => {
                joined.authorization_entries += 1;
                joined.authorization_not_utf8 |= not_utf8();
            }
            ":path" | ":authority" | ":method"
                if joined.pseudo_not_utf8.is_none() && not_utf8() =>
            {
                joined.pseudo_not_utf8 = Some(match name.as_str() {
                    ":path" => RequestProblem::PATH_FIELD,
                    ":authority" => "attributes.request.http.header_map[:authority]",
                    _ => "attributes.request.http.header_map[:method]",
                });
            }
            _ => {}
        }
        match index.get(&name) {
            Some(&at) => {
                let earlier = &mut joined.entries[at].1;
                earlier.push(',');
                earlier.push_str(&value);
            }
            None => {
                index.insert(name.clone(), joined.entries.len());
                joined.entries.push((name, value.into_owned()));
            }
        }
    }
    joined
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext,
        attribute_context::{HttpRequest, Request as EnvoyRequest},
    };

    use envoy_types::pb::envoy::{
        config::core::v3::{HeaderMap, HeaderValue},
        service::auth::v3::{CheckRequest as EnvoyCheckRequest, CheckResponse},
    };
    use prost::Message as _;

    use super::*;
    use crate::{
        policy::testing::{DEMO_POLICY, compile_policy},
        request::HeaderLimits,
    };

    /// What stepgate reads from the request as envoy-types encodes it.
    fn access(check: EnvoyCheckRequest) -> AccessRequest {
        let bytes = check.encode_to_vec();
        access_request(CheckRequest::decode(bytes.into(), HeaderLimits::DEFAULT).expect("decodes"))
    }

    /// The bearer token the request presents, if its credential is usable.
    fn bearer(access: &AccessRequest) -> Option<&str> {
        match access.credential() {
            crate::identity::Credential::Bearer(token) => Some(token),
            _ => None,
        }
    }

    fn check_with_headers(headers: &[(&str, &str)]) -> EnvoyCheckRequest {
        let headers: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        EnvoyCheckRequest {
            attributes: Some(AttributeContext {
                request: Some(EnvoyRequest {
                    time: None,
                    http: Some(HttpRequest {
                        method: "GET".into(),
                        path: "/accounts/42".into(),
                        host: "api.example.com:443".into(),
                        headers,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn lower_case_header_names_are_taken_as_decoded() {
        let access = access(check_with_headers(&[
            ("authorization", "Bearer abc"),
            ("x-request-id", "1"),
        ]));
        let http = access.http.as_ref().expect("http attributes");
        assert_eq!(http.headers.len(), 2);
        assert_eq!(http.headers.get("x-request-id"), Some("1"));
        assert_eq!(
            (http.method.as_str(), http.host.as_str()),
            ("GET", "api.example.com")
        );
        assert_eq!(http.target, "/accounts/42");
        assert_eq!(access.credential, PresentedCredential::AuthorizationHeader);
        assert_eq!(bearer(&access), Some("abc"));
        assert_eq!(access.proxy_header_count, Some(2));
    }

    #[test]
    fn header_names_in_another_case_are_folded() {
        let access = access(check_with_headers(&[
            ("Authorization", "Bearer abc"),
            ("X-Request-Id", "1"),
        ]));
        let http = access.http.as_ref().expect("http attributes");
        let mut names: Vec<&str> = http.headers.iter().map(|(name, _)| name).collect();
        names.sort_unstable();
        assert_eq!(names, ["authorization", "x-request-id"]);
        assert_eq!(access.credential, PresentedCredential::AuthorizationHeader);
        assert_eq!(bearer(&access), Some("abc"));
    }

    fn http_of(check: &mut EnvoyCheckRequest) -> &mut HttpRequest {
        check
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .expect("http")
    }

    /// A method left empty is `:method`'s; without either the request is refused (a rule naming
    /// methods would not match it, and one naming none would).
    #[test]
    fn a_check_without_a_method_is_refused() {
        use crate::policy::testing::{DEMO_POLICY, compile_policy};
        let policy = compile_policy(DEMO_POLICY);
        let mut check = check_with_headers(&[(":method", "POST")]);
        http_of(&mut check).method.clear();
        assert_eq!(access(check.clone()).http.unwrap().method, "POST");
        let mut check = check_with_headers(&[]);
        http_of(&mut check).method.clear();
        let decision = crate::decision::decide(&policy, &access(check), 1_700_000_000);
        assert_eq!(
            (decision.http_status, decision.reason),
            (400, crate::decision::Reason::MalformedRequest),
            "{decision:?}"
        );
    }

    /// `check_with_headers`, its headers sent as Envoy's `encode_raw_headers` does.
    fn check_with_raw_headers(headers: &[(&str, &[u8])]) -> EnvoyCheckRequest {
        let mut check = check_with_headers(&[]);
        let http = http_of(&mut check);
        http.header_map = Some(HeaderMap {
            headers: headers
                .iter()
                .map(|(key, raw)| HeaderValue {
                    key: (*key).to_owned(),
                    value: String::new(),
                    raw_value: raw.to_vec(),
                })
                .collect(),
        });
        check
    }

    #[test]
    fn raw_headers_are_joined_and_counted_per_entry() {
        let access = access(check_with_raw_headers(&[
            ("authorization", b"Bearer abc"),
            ("x-forwarded-for", b"10.0.0.1"),
            ("X-Forwarded-For", b"10.0.0.2"),
        ]));
        let http = access.http.as_ref().expect("http attributes");
        assert_eq!(
            http.headers.get("x-forwarded-for"),
            Some("10.0.0.1,10.0.0.2")
        );
        assert_eq!(access.proxy_header_count, Some(3));
        assert_eq!(access.credential, PresentedCredential::AuthorizationHeader);
        assert_eq!(bearer(&access), Some("abc"));
    }

    #[test]
    fn a_name_in_both_header_fields_gets_both_values() {
        let mut check = check_with_raw_headers(&[("x-forwarded-for", b"10.0.0.2")]);
        let http = http_of(&mut check);
        http.headers
            .insert("x-forwarded-for".into(), "10.0.0.1".into());
        http.headers
            .insert("authorization".into(), "Bearer abc".into());
        let access = access(check);
        let headers = &access.http.as_ref().expect("http attributes").headers;
        assert_eq!(headers.get("x-forwarded-for"), Some("10.0.0.1,10.0.0.2"));
        assert_eq!(headers.count("x-forwarded-for"), 1);
        assert_eq!(bearer(&access), Some("abc"));
    }

    #[test]
    fn two_authorization_entries_make_the_credential_unusable() {
        let raw = access(check_with_raw_headers(&[
            ("authorization", b"Bearer abc"),
            ("authorization", b"Bearer def"),
        ]));
        let folded = access(check_with_headers(&[
            ("authorization", "Bearer abc"),
            ("Authorization", "Bearer def"),
        ]));
        let mut both_fields = check_with_raw_headers(&[("authorization", b"Bearer abc")]);
        http_of(&mut both_fields)
            .headers
            .insert("authorization".into(), "Bearer abc".into());
        let both_fields = access(both_fields);
        for access in [raw, folded, both_fields] {
            assert_eq!(
                access.credential,
                PresentedCredential::Unusable(CredentialProblem::MultipleCredentials)
            );
        }
    }

    #[test]
    fn a_raw_path_that_is_not_utf8_is_an_invalid_path_whatever_path_says() {
        // What Envoy sends for a request line `GET /a\xffb`: `path` with `!`, `:path` raw.
        let mut check = check_with_raw_headers(&[(":path", b"/a\xffb"), ("x-odd", b"\xff")]);
        http_of(&mut check).path = "/a!b".into();
        let access = access(check);
        assert_eq!(
            access.problem,
            Some(RequestProblem::NotUtf8(RequestProblem::PATH_FIELD))
        );
        // Other headers' odd bytes are only replaced.
        let access = access_of_raw(&[(":path", b"/ab"), ("x-odd", b"\xff")]);
        assert_eq!(access.problem, None);
        let http = access.http.expect("http attributes");
        assert_eq!(http.headers.get("x-odd"), Some("\u{fffd}"));
    }

    fn access_of_raw(headers: &[(&str, &[u8])]) -> AccessRequest {
        access(check_with_raw_headers(headers))
    }

    #[test]
    fn an_authorization_value_that_is_not_utf8_is_unusable() {
        let access = access(check_with_raw_headers(&[("authorization", b"Bearer \xff")]));
        assert_eq!(
            access.credential,
            PresentedCredential::Unusable(CredentialProblem::InvalidBytes)
        );
    }

    #[test]
    fn pseudo_headers_stand_in_for_missing_attributes() {
        let mut check = check_with_headers(&[
            (":method", "DELETE"),
            (":authority", "Admin.Example.com:8443"),
            (":path", "/users/7"),
        ]);
        let http = http_of(&mut check);
        (http.method, http.host, http.path) = Default::default();
        let http = access(check).http.expect("http attributes");
        assert_eq!(
            (
                http.method.as_str(),
                http.host.as_str(),
                http.target.as_str()
            ),
            ("DELETE", "admin.example.com", "/users/7")
        );
    }

    #[test]
    fn source_context_and_operation_are_read() {
        let mut check = demo_check();
        check
            .attributes
            .as_mut()
            .expect("attributes")
            .context_extensions
            .insert("operation".into(), "payments.transfer".into());
        let access = access(check);
        assert_eq!(access.operation.as_deref(), Some("payments.transfer"));
        assert_eq!(
            access.context.get("operation").and_then(|v| v.as_str()),
            Some("payments.transfer")
        );
        let source = access.source.expect("source");
        assert_eq!(source.address, "10.1.2.3");
        assert_eq!(access.client_certificate, None, "none sent");
    }

    /// Envoy's `source.certificate` (with `include_peer_certificate`) as it comes, for the
    /// engine to read only if the token is bound to a certificate; empty is none.
    #[test]
    fn the_source_certificate_is_kept_as_envoy_sends_it() {
        let pem = "-----BEGIN%20CERTIFICATE-----%0AAAEC%0A-----END%20CERTIFICATE-----%0A";
        for (sent, kept) in [
            (pem, Some(ClientCertificate::UrlEncodedPem(pem.into()))),
            ("", None),
        ] {
            let mut check = demo_check();
            let attributes = check.attributes.as_mut().expect("attributes");
            attributes.source.as_mut().expect("source").certificate = sent.to_owned();
            assert_eq!(access(check).client_certificate, kept, "{sent:?}");
        }
    }

    fn demo_check() -> EnvoyCheckRequest {
        crate::demo::envoy_check_request("GET", "api.example.com", "/accounts/42", "t")
    }

    fn status_header(response: &http::Response<CallBody>) -> Option<&[u8]> {
        response.headers().get("grpc-status").map(|v| v.as_bytes())
    }

    fn service(max_message_bytes: usize) -> ExtAuthz {
        let policy = compile_policy(DEMO_POLICY);
        ExtAuthz::new(
            Arc::new(Authorizer::new(Arc::new(policy))),
            max_message_bytes,
            grpc_message::Budget::new(usize::MAX),
        )
    }

    fn check_call(body: Vec<u8>) -> http::Request<http_body_util::Full<Bytes>> {
        http::Request::builder()
            .method("POST")
            .uri(CHECK_PATH)
            .header("content-type", "application/grpc")
            .body(http_body_util::Full::new(Bytes::from(body)))
            .unwrap()
    }

    /// The `CheckResponse` of a successful call, and its trailers' `grpc-status`.
    async fn answered(response: http::Response<CallBody>) -> (String, CheckResponse) {
        assert_eq!(status_header(&response), None, "{:?}", response.headers());
        let collected = response.into_body().collect().await.expect("a body");
        let status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = collected.to_bytes();
        let len = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(
            (bytes[0], len),
            (0, bytes.len() - 5),
            "one uncompressed frame"
        );
        let message = CheckResponse::decode(&bytes[5..]).expect("a CheckResponse");
        (status, message)
    }

    /// The denial's HTTP status and body.
    fn denial(answer: CheckResponse) -> (u32, String) {
        let Some(
            envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse::DeniedResponse(
                denied,
            ),
        ) = answer.http_response
        else {
            panic!("not a denial: {answer:?}");
        };
        (denied.status.map_or(0, |s| s.code as u32), denied.body)
    }

    /// A gRPC frame (uncompressed) around `message`.
    fn frame(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    #[tokio::test]
    async fn a_frame_over_the_size_limit_is_a_413_denial_not_a_grpc_error() {
        let big = check_with_headers(&[("x-filler", &"f".repeat(5000))]).encode_to_vec();
        let response = service(4096).call(check_call(frame(&big))).await;
        let (status, answer) = answered(response).await;
        assert_eq!(status, "0");
        assert_eq!(answer.status.as_ref().map(|s| s.code), Some(8));
        let (http_status, body) = denial(answer);
        assert_eq!(http_status, 413);
        assert!(body.contains("request_too_large"), "{body}");
        // Under the limit, the same request is decided.
        let response = service(64 * 1024).call(check_call(frame(&big))).await;
        let (_, answer) = answered(response).await;
        assert_eq!(answer.status.map(|s| s.code), Some(16), "no token: 401");
    }

    #[tokio::test]
    async fn content_that_is_not_utf8_is_a_400_denial_not_a_grpc_error() {
        let mut check = check_with_headers(&[]);
        http_of(&mut check).path = "/x".into();
        let mut bytes = check.encode_to_vec();
        let at = bytes.windows(2).position(|w| w == b"/x").unwrap();
        bytes[at + 1] = 0xff;
        let response = service(64 * 1024).call(check_call(frame(&bytes))).await;
        let (status, answer) = answered(response).await;
        assert_eq!(status, "0");
        assert_eq!(answer.status.as_ref().map(|s| s.code), Some(3));
        assert_eq!(
            answer.status.map(|s| s.message).as_deref(),
            Some("invalid_path")
        );
    }

    /// Bodies that are not one uncompressed `CheckRequest`: each a `400 malformed_request`
    /// denial saying why, never a gRPC error (which `failure_mode_allow` would let through).
    #[tokio::test]
    async fn a_call_that_is_not_one_check_request_is_a_400_denial_not_a_grpc_error() {
        let good = frame(&demo_check().encode_to_vec());
        let mut compressed = good.clone();
        compressed[0] = 1;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            // Field 1, length 5, with nothing after.
            (
                "not protobuf",
                frame(&[0x0a, 0x05]),
                "not a well-formed CheckRequest",
            ),
            ("compressed", compressed, "compressed"),
            ("no message", Vec::new(), "no message"),
            (
                "truncated",
                good[..good.len() - 1].to_vec(),
                "ends inside a message",
            ),
            (
                "two messages",
                [good.clone(), good.clone()].concat(),
                "more than one message",
            ),
        ];
        for (case, body, why) in cases {
            let response = service(64 * 1024).call(check_call(body)).await;
            let (status, answer) = answered(response).await;
            assert_eq!(status, "0", "{case}");
            assert_eq!(
                answer.status.as_ref().map(|s| (s.code, s.message.as_str())),
                Some((3, "malformed_request")),
                "{case}"
            );
            let (http_status, body) = denial(answer);
            assert_eq!(http_status, 400, "{case}");
            assert!(body.contains(why), "{case}: {body}");
        }
        // A message encoding named in the headers is refused too, whatever the flag says.
        let mut gzip = check_call(good.clone());
        gzip.headers_mut()
            .insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        let (_, answer) = answered(service(64 * 1024).call(gzip).await).await;
        assert!(denial(answer).1.contains("compressed"));
        let mut identity = check_call(good);
        identity
            .headers_mut()
            .insert("grpc-encoding", http::HeaderValue::from_static("identity"));
        let (_, answer) = answered(service(64 * 1024).call(identity).await).await;
        assert_eq!(
            answer.status.map(|s| s.code),
            Some(16),
            "decided: no token, 401"
        );
    }

    #[tokio::test]
    async fn a_panic_while_deciding_is_a_500_denial_not_a_reset_stream() {
        let policy = Arc::new(compile_policy(DEMO_POLICY));
        let broken =
            |_: &crate::policy::Policy, request: &AccessRequest, _: i64, _: i64| -> Decision {
                let rules: [Decision; 0] = [];
                let index = request.explain as usize + 2;
                rules[index].clone()
            };
        let service = ExtAuthz::new(
            Arc::new(Authorizer::with_engine(policy, broken)),
            64 * 1024,
            grpc_message::Budget::new(usize::MAX),
        );
        for by_deadline in [false, true] {
            let request = check_call(frame(&demo_check().encode_to_vec()));
            let service = service.clone();
            let response = if by_deadline {
                service
                    .call_by(request, Instant::now(), Duration::from_secs(5))
                    .await
            } else {
                service.call(request).await
            };
            let (status, answer) = answered(response).await;
            assert_eq!(status, "0");
            let code = answer.status.as_ref().map(|s| (s.code, s.message.as_str()));
            assert_eq!(code, Some((13, "internal_error")));
            assert_eq!(denial(answer).0, 500);
        }
    }
}
