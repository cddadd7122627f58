//! The invariants of stepgate's hand-written parsers, as functions of arbitrary bytes that panic
//! when one is broken. Each parser is held to a twin: the maintained library it replaces on the
//! request path (prost for the `CheckRequest` reader, tonic for the gRPC message reader,
//! serde_json for the JWS reader, a regex for path globs, `grpc-timeout`, the B3 trace headers
//! and the hosts of a `Forwarded` header, opentelemetry for the `tracestate` bound,
//! `form_urlencoded` for the names the method-override check reads in a query), or a property where there is no library
//! (path normalisation, the policy loader, the redaction of query tokens in records, the HTTP/2
//! frame follower against a reading of the whole stream).
//!
//! Three callers share them: the cargo-fuzz targets under `fuzz/` (libFuzzer, nightly), the test
//! that replays every committed corpus entry and crash on stable (`tests/fuzz_corpus.rs`), and the
//! proptest properties beside it. Not part of the service: nothing on the request path calls them.

pub mod b3;
pub mod check_request;
pub mod forwarded;
pub mod frames;
pub mod grpc_message;
pub mod jws;
pub mod overrides;
pub mod path;
pub mod pattern;
pub mod policy;
pub mod query;
pub mod tracestate;

/// One fuzz target: its name (`fuzz/fuzz_targets/<name>.rs`, corpus `fuzz/corpus/<name>/`), the
/// invariant (panics when bytes break it) and the inputs its corpus starts from.
pub struct Target {
    pub name: &'static str,
    pub check: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "b3",
        check: b3::check,
        seeds: b3::seeds,
    },
    Target {
        name: "check_request",
        check: check_request::check,
        seeds: check_request::seeds,
    },
    Target {
        name: "forwarded",
        check: forwarded::check,
        seeds: forwarded::seeds,
    },
    Target {
        name: "frames",
        check: frames::check,
        seeds: frames::seeds,
    },
    Target {
        name: "grpc_message",
        check: grpc_message::check,
        seeds: grpc_message::seeds,
    },
    Target {
        name: "jws",
        check: jws::check,
        seeds: jws::seeds,
    },
    Target {
        name: "overrides",
        check: overrides::check,
        seeds: overrides::seeds,
    },
    Target {
        name: "path",
        check: path::check,
        seeds: path::seeds,
    },
    Target {
        name: "pattern",
        check: pattern::check,
        seeds: pattern::seeds,
    },
    Target {
        name: "policy",
        check: policy::check,
        seeds: policy::seeds,
    },
    Target {
        name: "query",
        check: query::check,
        seeds: query::seeds,
    },
    Target {
        name: "tracestate",
        check: tracestate::check,
        seeds: tracestate::seeds,
    },
];
