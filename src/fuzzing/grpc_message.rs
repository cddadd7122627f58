//! `server::grpc_message` against its twins.
//!
//! The first byte picks the parser:
//! - even: the unary body reader, against tonic's own (`Grpc::unary`, which stepgate's `Check`
//!   used before it was served directly). The second byte sets the size limit, the third how the
//!   rest (the body) is cut into chunks, as HTTP/2 DATA frames would cut it. Where tonic takes a
//!   message, the reader takes the same bytes; where the prefix is over the limit, both refuse it
//!   as too large; where tonic fails, the reader refuses too. The one difference is by design:
//!   bytes after the first message are refused, where tonic takes the first and reads on.
//!   The same chunks go through `Unfinished` (what tonic's calls are charged for), whose count
//!   after each chunk must equal the bytes after the last whole message of the body so far, read
//!   whole from its start, and whose messages ended the whole messages there.
//! - odd: `parse_timeout` on the rest, against the gRPC specification's grammar as a regex
//!   (`TimeoutValue` = 1 to 8 digits, `TimeoutUnit` = one of `H M S m u n`).

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use bytes::{Buf as _, Bytes};
use http_body::Frame;
use http_body_util::StreamBody;
use regex::bytes::Regex;
use tonic::{
    Code, Request, Response, Status,
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    server::{Grpc, UnaryService},
};
use tonic_prost::ProstEncoder;

use crate::server::grpc_message::{
    MORE_THAN_ONE, PREFIX, Unary, UnaryReader, Unfinished, parse_timeout,
};

pub fn check(bytes: &[u8]) {
    match bytes.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => check_reader(rest),
        Some((_, rest)) => check_timeout(rest),
        None => {}
    }
}

fn check_reader(bytes: &[u8]) {
    let [limit, cut, body @ ..] = bytes else {
        return;
    };
    let max = usize::from(*limit) * 4;
    let chunks = cut_into_chunks(body, *cut);
    let ours = {
        let mut reader = UnaryReader::new(max);
        chunks
            .iter()
            .find_map(|chunk| reader.push(chunk.clone()))
            .unwrap_or_else(|| reader.finish())
    };
    let mut unfinished = Unfinished::default();
    let mut so_far = Vec::new();
    for chunk in &chunks {
        so_far.extend_from_slice(chunk);
        let held = unfinished.push(chunk);
        assert_eq!(
            (held, unfinished.ended()),
            whole_messages(&so_far),
            "body {body:02x?}"
        );
    }
    let theirs = tonic_reads(chunks, max);
    match (&ours, &theirs) {
        (Unary::Message(a), Ok(b)) => assert_eq!(a, b, "body {body:02x?}"),
        (Unary::TooLarge(_), Err(code)) => assert_eq!(*code, Code::OutOfRange, "body {body:02x?}"),
        (Unary::Malformed(MORE_THAN_ONE), Ok(first)) => {
            let len = u32::from_be_bytes(body[1..PREFIX].try_into().expect("4 bytes")) as usize;
            assert_eq!(first[..], body[PREFIX..PREFIX + len], "body {body:02x?}");
            assert!(body.len() > PREFIX + len, "body {body:02x?}");
        }
        (Unary::Malformed(MORE_THAN_ONE), Err(_)) => {}
        (Unary::Malformed(_), Err(code)) => {
            assert_ne!(*code, Code::OutOfRange, "body {body:02x?}");
        }
        _ => panic!("ours {ours:?}, tonic's {theirs:?}, body {body:02x?}"),
    }
}

/// The bytes of `body` after its last whole message, and how many whole messages it holds (its
/// messages read one after the other from the start).
fn whole_messages(body: &[u8]) -> (usize, u64) {
    let (mut at, mut count) = (0, 0);
    while let Some(prefix) = body.get(at..at + PREFIX) {
        let len = u32::from_be_bytes(prefix[1..].try_into().expect("4 bytes")) as usize;
        match at.checked_add(PREFIX + len) {
            Some(end) if end <= body.len() => (at, count) = (end, count + 1),
            _ => break,
        }
    }
    (body.len() - at, count)
}

/// `body` in chunks of 1, 2, … `cut % 16 + 1` bytes, cycling (`cut` ≥ 128: one chunk).
fn cut_into_chunks(body: &[u8], cut: u8) -> Vec<Bytes> {
    if cut >= 128 {
        return vec![Bytes::copy_from_slice(body)];
    }
    let widest = usize::from(cut % 16) + 1;
    let mut chunks = Vec::new();
    let mut rest = body;
    let mut width = 1;
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(width.min(rest.len()));
        chunks.push(Bytes::copy_from_slice(chunk));
        rest = after;
        width = width % widest + 1;
    }
    chunks
}

/// What tonic's unary server reads from the body: the message, or the call's gRPC status code.
fn tonic_reads(chunks: Vec<Bytes>, max: usize) -> Result<Bytes, Code> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    });
    let taken = Arc::new(Mutex::new(None));
    let service = Take(Arc::clone(&taken));
    let frames = chunks
        .into_iter()
        .map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
    let request = http::Request::new(StreamBody::new(tokio_stream::iter(frames)));
    let response = runtime.block_on(
        Grpc::new(RawCodec)
            .max_decoding_message_size(max)
            .unary(service, request),
    );
    let taken = taken.lock().expect("not poisoned").take();
    match (response.headers().get("grpc-status"), taken) {
        (None, Some(message)) => Ok(message),
        (Some(status), _) => Err(Code::from_bytes(status.as_bytes())),
        (None, None) => panic!("tonic answered without calling the service"),
    }
}

struct Take(Arc<Mutex<Option<Bytes>>>);

impl UnaryService<Bytes> for Take {
    type Response = ();
    type Future = std::future::Ready<Result<Response<()>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        *self.0.lock().expect("not poisoned") = Some(request.into_inner());
        std::future::ready(Ok(Response::new(())))
    }
}

/// Messages as their bytes.
struct RawCodec;

impl Codec for RawCodec {
    type Encode = ();
    type Decode = Bytes;
    type Encoder = ProstEncoder<()>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

fn check_timeout(value: &[u8]) {
    static GRAMMAR: OnceLock<Regex> = OnceLock::new();
    let grammar = GRAMMAR.get_or_init(|| Regex::new(r"\A([0-9]{1,8})([HMSmun])\z").expect("valid"));
    let expected = grammar.captures(value).map(|c| {
        let n: u64 = std::str::from_utf8(&c[1])
            .expect("digits")
            .parse()
            .expect("at most 8 digits");
        match &c[2] {
            b"H" => Duration::from_secs(n * 3600),
            b"M" => Duration::from_secs(n * 60),
            b"S" => Duration::from_secs(n),
            b"m" => Duration::from_millis(n),
            b"u" => Duration::from_micros(n),
            _ => Duration::from_nanos(n),
        }
    });
    assert_eq!(parse_timeout(value), expected, "value {value:02x?}");
}

/// Bodies (a valid Check frame whole and cut, refusals of each kind) and timeouts.
pub fn seeds() -> Vec<Vec<u8>> {
    use prost::Message as _;
    let message =
        crate::demo::envoy_check_request("GET", "api.example.com", "/a", "t").encode_to_vec();
    let frame = |flag: u8, message: &[u8]| {
        let mut out = vec![flag];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    };
    let body = frame(0, &message);
    let reader = |limit: u8, cut: u8, body: &[u8]| [&[0, limit, cut][..], body].concat();
    let timeout = |value: &[u8]| [&[1][..], value].concat();
    vec![
        reader(255, 200, &body),
        reader(255, 3, &body),
        reader(255, 15, &body),
        reader(1, 200, &body),
        reader(255, 200, &frame(1, &message)),
        reader(255, 200, &frame(2, b"x")),
        reader(255, 200, &[body.clone(), body.clone()].concat()),
        reader(255, 4, &body[..body.len() - 3]),
        reader(255, 200, &[]),
        timeout(b"200m"),
        timeout(b"99999999H"),
        timeout(b"123456789S"),
        timeout(b"+5m"),
        timeout(b"5"),
    ]
}
