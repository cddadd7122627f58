//! The fuzz targets' invariants (`stepgate::fuzzing`) as proptest properties, run on stable in
//! every test run: where the fuzzer explores bytes at random, these build inputs from the pieces
//! that matter (dot segments, escapes, parameters; stars and double stars; repeated JSON names,
//! escapes and surrogates; protobuf messages merged and corrupted; gRPC frames that lie about their
//! length; policy lines out of place), so the same invariants are checked on inputs a random walk
//! would rarely reach.

use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue},
    service::auth::v3::{
        AttributeContext, CheckRequest,
        attribute_context::{HttpRequest, Request},
    },
};
use proptest::{collection::vec, prelude::*, sample::select};
use prost::Message as _;
use stepgate::fuzzing;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn normalised_paths_are_normal_unambiguous_and_mean_the_same(
        pieces in vec(select(&[
            "/", "/", "a", "B", ".", "..", "%2e", "%2E", "%2f", "%5C", "%25", ";", ";x=1", "%3b",
            "%C3%A9", "é", "\\", "%00", "?q=1", "#f", "~", "%41", "%", "%4", "%zz", "%C3",
        ][..]), 0..10)
    ) {
        let path = format!("/{}", pieces.concat());
        fuzzing::path::check(path.as_bytes());
    }

    #[test]
    fn globs_and_wildcards_match_as_their_regex_does_within_the_step_bound(
        glob in vec(select(&["", "*", "**", "a", "b*", "*c", "a*b", "ab", "**", "*"][..]), 0..7),
        path in vec(select(&["a", "b", "ab", "c", "ac", "bc", "abc", "", "A"][..]), 0..12),
    ) {
        let input = format!("/{}\n/{}", glob.join("/"), path.join("/"));
        fuzzing::pattern::check(input.as_bytes());
    }

    #[test]
    fn the_jws_reader_reads_as_serde_json_does(members in vec(member(), 0..8)) {
        let json = format!("{{{}}}", members.join(","));
        fuzzing::jws::check(json.as_bytes());
    }

    #[test]
    fn the_jws_reader_refuses_what_serde_json_refuses(bytes in vec(any::<u8>(), 0..64)) {
        fuzzing::jws::check(&bytes);
    }

    #[test]
    fn the_check_request_reader_reads_as_prost_does(
        first in check_request(),
        second in check_request(),
        corruptions in vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
    ) {
        let one = first.encode_to_vec();
        fuzzing::check_request::check(&one);
        // Two messages concatenated are one merged message.
        let mut merged = [one, second.encode_to_vec()].concat();
        fuzzing::check_request::check(&merged);
        if !merged.is_empty() {
            for (at, byte) in corruptions {
                let at = at.index(merged.len());
                merged[at] = byte;
            }
            fuzzing::check_request::check(&merged);
        }
    }

    #[test]
    fn the_unary_body_reader_reads_as_tonic_does(
        frames in vec((0u8..3, vec(any::<u8>(), 0..24), any::<bool>()), 0..3),
        cut_off in 0usize..3,
        limit in select(&[0u8, 2, 5, 255][..]),
        cut in any::<u8>(),
    ) {
        // Frames with a flag of 0, 1 or 2 whose prefix tells the truth or a larger length, then
        // the body cut short by up to two bytes, chunked as `cut` says.
        let mut body = Vec::new();
        for (flag, message, lies) in frames {
            body.push(flag);
            let len = message.len() as u32 + if lies { 7 } else { 0 };
            body.extend(len.to_be_bytes());
            body.extend(message);
        }
        body.truncate(body.len().saturating_sub(cut_off));
        let input = [&[0, limit, cut][..], &body].concat();
        fuzzing::grpc_message::check(&input);
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_grammar_says(
        digits in "[0-9+ -]{0,10}",
        unit in select(&["H", "M", "S", "m", "u", "n", "s", "", "mm"][..]),
    ) {
        fuzzing::grpc_message::check(format!("\u{1}{digits}{unit}").as_bytes());
    }

    #[test]
    fn the_policy_loader_refuses_a_mangled_policy_without_panicking(
        line in any::<prop::sample::Index>(),
        junk in select(&[
            "", "  - id: x", "rules: 7", "    match: { path: \"/**/**\" }", "limits: { token_cache_bytes: 1GiB }",
            "    require: { max_age: -1 }", "      - { when: '(((', require: {} }", "issuers: []",
            "\t", "realm: \"a\\\"b\"", "    jwks_uri: http://example.com/keys", "default: maybe",
        ][..]),
        keep in any::<bool>(),
    ) {
        let demo = include_str!("../examples/stepgate.yaml");
        let mut lines: Vec<&str> = demo.lines().collect();
        let at = line.index(lines.len());
        if keep {
            lines.insert(at, junk);
        } else {
            lines[at] = junk;
        }
        fuzzing::policy::check(lines.join("\n").as_bytes());
    }

    #[test]
    fn query_tokens_are_redacted_and_nothing_else_moves(
        pairs in vec(
            (
                select(&["access_token", "%61ccess_token", "access%5Ftoken", "access_tokenx", "a", ""][..]),
                "[=a-zA-Z0-9.%+-]{0,8}",
                select(&["&", ";", "&&", "=" ][..]),
            ),
            0..6,
        ),
    ) {
        let query: String = pairs.iter().map(|(n, v, sep)| format!("{n}={v}{sep}")).collect();
        fuzzing::query::check(format!("/orders?{query}").as_bytes());
    }

    #[test]
    fn a_method_override_in_the_query_is_found_as_the_url_standard_and_php_read_it(
        pairs in vec(
            (
                (
                    select(&["", " ", "  ", "+", "%20", "x", "%"][..]),
                    select(&[
                        "_method", "_Method", "%5Fmethod", "%5fMETHOD", ".method", " method",
                        "[method", "_metho", "method", "_meth%6Fd", "%C3%A9", "%FF",
                    ][..]),
                    select(&["", "%00", "%00%zz", "%00x", "%", "%z", "%2", "x", "%5B", "é"][..]),
                ),
                select(&["&", ";", "&&"][..]),
            ),
            0..4,
        ),
    ) {
        let names: Vec<String> =
            pairs.iter().map(|((a, b, c), _)| format!("{a}{b}{c}")).collect();
        let query: String = names
            .iter()
            .zip(&pairs)
            .map(|(name, (_, sep))| format!("{name}=GET{sep}"))
            .collect();
        // The twin (the URL standard's decoding, then PHP's renaming) is the fuzz target's.
        fuzzing::overrides::check(query.as_bytes());
    }

    /// `Forwarded` values built of the pieces its readers split on: every host Spring, Quarkus or
    /// Rack take is among `forwarded_hosts` (the twins are the fuzz target's).
    #[test]
    fn forwarded_hosts_hold_every_host_a_lenient_reader_takes(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("host=".to_owned()),
                Just("HoSt=".to_owned()),
                Just("host".to_owned()),
                Just("hoſt".to_owned()),
                Just("=".to_owned()),
                Just("\t".to_owned()),
                Just("\n".to_owned()),
                Just("for=".to_owned()),
                Just("\"".to_owned()),
                Just(";".to_owned()),
                Just(",".to_owned()),
                Just(" ".to_owned()),
                Just("\\".to_owned()),
                "[a-z0-9.:\\[\\]-]{1,12}",
            ],
            0..16,
        ),
    ) {
        fuzzing::forwarded::check(parts.concat().as_bytes());
    }

    #[test]
    fn settings_frames_are_counted_however_the_bytes_arrive(
        seed in any::<u8>(),
        frames in vec(
            (
                // Mostly SETTINGS (not acknowledgements), so that both sides of the bound come.
                select(&[4u8, 4, 4, 4, 0, 1, 6, 8][..]),
                select(&[0u8, 0, 0, 1, 4][..]),
                vec(any::<u8>(), 0..24),
            ),
            0..300,
        ),
        cut in 0usize..9,
    ) {
        let mut bytes = vec![seed];
        for (kind, flags, payload) in &frames {
            let len = (payload.len() as u32).to_be_bytes();
            bytes.extend([len[1], len[2], len[3], *kind, *flags, 0, 0, 0, 1]);
            bytes.extend(payload);
        }
        // Sometimes the stream ends inside a frame.
        bytes.truncate(bytes.len().saturating_sub(cut).max(1));
        fuzzing::frames::check(&bytes);
    }

    #[test]
    fn the_tracestate_bound_truncates_as_w3c_says(
        members in vec(("[a-z][a-z0-9_-]{0,20}", "[!-+--<>-~]{0,140}", select(&[",", " ,", ",\t", ",,"][..])), 0..40),
    ) {
        let text: String = members.iter().map(|(k, v, sep)| format!("{k}={v}{sep}")).collect();
        fuzzing::tracestate::check(text.as_bytes());
    }
}

/// One JSON member `"name": value`, names from a small set so that they repeat.
fn member() -> impl Strategy<Value = String> {
    let name = select(
        &[
            "sub",
            "iss",
            "aud",
            "exp",
            "x",
            "s\\u0075b",
            "nonce",
            "e\\u0301",
        ][..],
    );
    (name, value(2)).prop_map(|(name, value)| format!("\"{name}\":{value}"))
}

/// A JSON value of at most `depth` levels of nesting, as text (possibly repeating names).
fn value(depth: u32) -> BoxedStrategy<String> {
    let leaf = select(
        &[
            "1",
            "-0",
            "1.5e3",
            "1e400",
            "18446744073709551616",
            "null",
            "true",
            "\"a\"",
            "\"\\ud800\"",
            "\"\\ud83d\\ude00\"",
            "\"\\u00e9\"",
            "\"\\\"\"",
            "[]",
            "{}",
        ][..],
    )
    .prop_map(str::to_owned);
    if depth == 0 {
        return leaf.boxed();
    }
    prop_oneof![
        3 => leaf,
        1 => vec(value(depth - 1), 0..3).prop_map(|items| format!("[{}]", items.join(","))),
        1 => vec((select(&["k", "k", "l"][..]), value(depth - 1)), 0..3).prop_map(|members| {
            let members: Vec<String> = members.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", members.join(","))
        }),
    ]
    .boxed()
}

/// An Envoy `CheckRequest` with the fields stepgate reads (and some it skips) filled from small
/// sets, so that names repeat and fold together.
fn check_request() -> impl Strategy<Value = CheckRequest> {
    let text = || {
        select(
            &[
                "",
                "a",
                "GET",
                "/p?q",
                "api.example.com:443",
                "é✓",
                ":path",
                "x-A",
            ][..],
        )
    };
    let headers = vec(
        (
            select(&["authorization", "Authorization", ":path", "x-a", ""][..]),
            text(),
        ),
        0..4,
    );
    let raw = vec(
        (
            select(&["authorization", ":path", "X-A"][..]),
            vec(any::<u8>(), 0..4),
        ),
        0..3,
    );
    (
        text(),
        text(),
        text(),
        headers,
        prop::option::of(raw),
        vec((text(), text()), 0..3),
    )
        .prop_map(|(method, path, host, headers, raw, context)| CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    time: None,
                    http: Some(HttpRequest {
                        method: method.into(),
                        path: path.into(),
                        host: host.into(),
                        headers: headers
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                        header_map: raw.map(|raw| HeaderMap {
                            headers: raw
                                .into_iter()
                                .map(|(key, raw_value)| HeaderValue {
                                    key: key.into(),
                                    value: String::new(),
                                    raw_value,
                                })
                                .collect(),
                        }),
                        ..Default::default()
                    }),
                }),
                context_extensions: context
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ..Default::default()
            }),
        })
}
