//! The invariants of stepgate's hand-written parsers, as functions of arbitrary bytes that panic
//! when one is broken. Each parser is held to a twin: the maintained library it replaces on the
//! request path (prost for the `CheckRequest` reader, serde_json for the JWS reader, a regex for
//! path globs), or a property where there is no library (path normalisation, the policy loader).
//!
//! Three callers share them: the cargo-fuzz targets under `fuzz/` (libFuzzer, nightly), the test
//! that replays every committed corpus entry and crash on stable (`tests/fuzz_corpus.rs`), and the
//! proptest properties beside it. Not part of the service: nothing on the request path calls them.

pub mod check_request;
pub mod jws;
pub mod path;
pub mod pattern;
pub mod policy;

/// One invariant: panics when `bytes` break it.
pub type Check = fn(&[u8]);

/// The fuzz targets, by name: what `fuzz/fuzz_targets/<name>.rs` calls and what the corpus under
/// `fuzz/corpus/<name>/` is replayed against.
pub const TARGETS: &[(&str, Check)] = &[
    ("check_request", check_request::check),
    ("jws", jws::check),
    ("path", path::check),
    ("pattern", pattern::check),
    ("policy", policy::check),
];
