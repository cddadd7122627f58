//! The two pieces of gRPC's wire format stepgate reads itself, on the `Check` path
//! (server/calls.rs): a unary call's request body (one message behind its 5-byte prefix) and the
//! `grpc-timeout` header. Their twins are tonic's message reader and the gRPC specification's
//! grammar (`fuzzing::grpc_message`).
//!
//! [`UnaryReader`] takes the body as HTTP/2 delivers it, one DATA frame's bytes at a time. When
//! the whole message arrives in one frame, as Envoy sends it, the message is a slice of that
//! frame: nothing is copied. It refuses as soon as the outcome is known:
//! - a compressed message (stepgate offers no compression, so a set flag is a protocol error, as
//!   the gRPC compression spec says) or a flag other than 0 and 1;
//! - a length over the limit, before any of the message is read;
//! - bytes after the one message: a unary call has exactly one, and a reader that took the first
//!   of two and one that took the last would decide different requests.
//!
//! Memory grows with the bytes that arrived, never with the length a prefix announces: a prefix
//! claiming 4 MiB followed by silence holds 5 bytes, not a 4 MiB buffer. The bytes a reader holds
//! while it waits for the rest of a message are charged to a [`Budget`] the process shares
//! (`--max-buffered-bytes`): many streams, each sending most of a large message and then waiting,
//! are refused when it runs out rather than taking the process's memory. A message that arrives
//! whole in one frame, as Envoy sends it, is decided at once and charges nothing.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::{Buf as _, Bytes, BytesMut};

/// The message prefix: the compressed flag (1 byte) and the length (4 bytes, big-endian).
pub const PREFIX: usize = 5;

/// What a unary request body held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unary {
    /// Its one message.
    Message(Bytes),
    /// The prefix announced this many bytes, over the limit; none of them were read.
    TooLarge(u32),
    /// Not one whole uncompressed message; why.
    Malformed(&'static str),
    /// Holding the bytes that came would take the shared [`Budget`] past its end.
    Overloaded,
}

/// Bytes that calls waiting for the rest of their message may hold, together.
#[derive(Debug)]
pub struct Budget {
    left: AtomicUsize,
}

impl Budget {
    pub fn new(bytes: usize) -> Arc<Self> {
        Arc::new(Self {
            left: AtomicUsize::new(bytes),
        })
    }

    /// Bytes not taken.
    pub fn left(&self) -> usize {
        self.left.load(Relaxed)
    }

    fn take(&self, bytes: usize) -> bool {
        self.left
            .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(bytes))
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.left.fetch_add(bytes, Relaxed);
    }
}

/// What one call holds of a [`Budget`], given back when it is dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Held {
    pub fn new(budget: Arc<Budget>) -> Self {
        Self { budget, bytes: 0 }
    }

    /// Takes `bytes` more; `false`, taking nothing, when the budget has fewer left.
    pub fn take(&mut self, bytes: usize) -> bool {
        let taken = self.budget.take(bytes);
        if taken {
            self.bytes += bytes;
        }
        taken
    }

    /// Holds exactly `bytes`: takes what is missing or gives back what is over. `false`, with
    /// the charge unchanged, when the budget cannot take what is missing.
    pub fn hold(&mut self, bytes: usize) -> bool {
        match bytes.checked_sub(self.bytes) {
            Some(more) => self.take(more),
            None => {
                self.budget.give(self.bytes - bytes);
                self.bytes = bytes;
                true
            }
        }
    }
}

/// Follows the gRPC messages of a request body as its frames pass on to a reader that buffers
/// each message until it is whole (tonic's): how many of the bytes that came belong to a message
/// not yet whole, which is what such a reader holds. A message arriving in one frame is never
/// held; a whole one is no longer. Its twin is the same count made over the body read whole
/// (`fuzzing::grpc_message`).
#[derive(Debug, Default)]
pub struct Unfinished {
    /// Prefix bytes of the next message that came (up to [`PREFIX`]).
    prefix: [u8; PREFIX],
    prefix_len: usize,
    /// Bytes of the message after a whole prefix still to come; `None` while reading a prefix.
    left: Option<usize>,
    /// Bytes of the current message that came, its prefix included.
    held: usize,
    /// Messages that ended so far.
    ended: u64,
}

impl Unfinished {
    /// Follows `chunk`, the body's next bytes; returns the bytes of the unfinished message after
    /// them.
    pub fn push(&mut self, mut chunk: &[u8]) -> usize {
        while !chunk.is_empty() {
            match self.left {
                None => {
                    let take = (PREFIX - self.prefix_len).min(chunk.len());
                    self.prefix[self.prefix_len..self.prefix_len + take]
                        .copy_from_slice(&chunk[..take]);
                    self.prefix_len += take;
                    self.held += take;
                    chunk = &chunk[take..];
                    if self.prefix_len == PREFIX {
                        let [_, a, b, c, d] = self.prefix;
                        let len = u32::from_be_bytes([a, b, c, d]);
                        self.left = Some(usize::try_from(len).unwrap_or(usize::MAX));
                    }
                }
                Some(left) => {
                    let take = left.min(chunk.len());
                    self.left = Some(left - take);
                    self.held += take;
                    chunk = &chunk[take..];
                }
            }
            if self.left == Some(0) {
                *self = Self {
                    ended: self.ended + 1,
                    ..Self::default()
                };
            }
        }
        self.held
    }

    /// The messages that ended in the chunks pushed so far.
    pub fn ended(&self) -> u64 {
        self.ended
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

/// Why a call past the [`Budget`] is refused.
/// `message` as a gRPC message frame: not compressed, its length, the message.
pub fn frame(message: &[u8]) -> Bytes {
    let len = u32::try_from(message.len()).expect("a message stepgate frames is far below 4 GiB");
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.extend_from_slice(&[0]);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    framed.freeze()
}

pub const OVER_BUDGET: &str =
    "stepgate holds as many unfinished request bytes as it may (--max-buffered-bytes); retry";

pub const COMPRESSED: &str = "the message is compressed, and stepgate offers no compression";
pub const BAD_FLAG: &str = "the message prefix's compressed flag is neither 0 nor 1";
pub const NO_MESSAGE: &str = "the call carries no message";
pub const TRUNCATED: &str = "the body ends inside a message";
pub const MORE_THAN_ONE: &str = "a unary call carries more than one message";

/// Reads one unary request body, chunk by chunk; see the module docs.
#[derive(Debug)]
pub struct UnaryReader {
    max: usize,
    state: State,
    /// Bytes received and not yet taken as the prefix or the message.
    buf: BytesMut,
    /// What `buf`'s bytes are charged to (none: unbounded).
    held: Option<Held>,
}

#[derive(Debug)]
enum State {
    /// Waiting for the prefix.
    Prefix,
    /// Waiting for a message of this many bytes.
    Message(usize),
    /// The message arrived; nothing more may.
    Done(Bytes),
}

impl UnaryReader {
    /// A reader refusing messages over `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            state: State::Prefix,
            buf: BytesMut::new(),
            held: None,
        }
    }

    /// A reader whose buffered bytes are charged to `budget`.
    pub fn with_budget(max: usize, budget: Arc<Budget>) -> Self {
        let mut reader = Self::new(max);
        reader.held = Some(Held::new(budget));
        reader
    }

    /// Charges `bytes` about to be buffered; `false` when the budget cannot take them.
    fn charge(&mut self, bytes: usize) -> bool {
        self.held.as_mut().is_none_or(|held| held.take(bytes))
    }

    /// Takes the body's next bytes. `Some` is a refusal known before the body ends: stop reading.
    pub fn push(&mut self, chunk: Bytes) -> Option<Unary> {
        if chunk.is_empty() {
            return None;
        }
        if let State::Done(_) = self.state {
            return Some(Unary::Malformed(MORE_THAN_ONE));
        }
        // The whole message in one chunk: keep a slice of it.
        if self.buf.is_empty() && matches!(self.state, State::Prefix) && chunk.len() >= PREFIX {
            let len = match self.length(&chunk[..PREFIX]) {
                Ok(len) => len,
                Err(refusal) => return Some(refusal),
            };
            let end = PREFIX + len;
            if chunk.len() >= end {
                if chunk.len() > end {
                    return Some(Unary::Malformed(MORE_THAN_ONE));
                }
                self.state = State::Done(chunk.slice(PREFIX..end));
                return None;
            }
            if !self.charge(chunk.len() - PREFIX) {
                return Some(Unary::Overloaded);
            }
            self.state = State::Message(len);
            self.buf.extend_from_slice(&chunk[PREFIX..]);
            return None;
        }
        if !self.charge(chunk.len()) {
            return Some(Unary::Overloaded);
        }
        self.buf.extend_from_slice(&chunk);
        loop {
            match self.state {
                State::Prefix if self.buf.len() >= PREFIX => {
                    let len = match self.length(&self.buf[..PREFIX]) {
                        Ok(len) => len,
                        Err(refusal) => return Some(refusal),
                    };
                    self.buf.advance(PREFIX);
                    self.state = State::Message(len);
                }
                State::Message(len) if self.buf.len() >= len => {
                    let message = self.buf.split_to(len).freeze();
                    if !self.buf.is_empty() {
                        return Some(Unary::Malformed(MORE_THAN_ONE));
                    }
                    self.state = State::Done(message);
                    return None;
                }
                _ => return None,
            }
        }
    }

    /// The body ended: what it held.
    pub fn finish(self) -> Unary {
        match self.state {
            State::Done(message) => Unary::Message(message),
            State::Prefix if self.buf.is_empty() => Unary::Malformed(NO_MESSAGE),
            State::Prefix | State::Message(_) => Unary::Malformed(TRUNCATED),
        }
    }

    /// The length a prefix announces, or why the message is refused (checked in tonic's order:
    /// the flag, then the length).
    fn length(&self, prefix: &[u8]) -> Result<usize, Unary> {
        match prefix[0] {
            0 => {}
            1 => return Err(Unary::Malformed(COMPRESSED)),
            _ => return Err(Unary::Malformed(BAD_FLAG)),
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        match usize::try_from(len) {
            Ok(len) if len <= self.max => Ok(len),
            _ => Err(Unary::TooLarge(len)),
        }
    }
}

/// A `grpc-timeout` value (`TimeoutValue TimeoutUnit`: 1 to 8 ASCII digits, then one of
/// `H M S m u n`), or `None` when it does not follow that grammar (the header is then ignored,
/// as tonic and grpc-go do).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend((message.len() as u32).to_be_bytes());
        out.extend(message);
        out
    }

    fn read(chunks: &[&[u8]], max: usize) -> Unary {
        let mut reader = UnaryReader::new(max);
        for chunk in chunks {
            if let Some(refusal) = reader.push(Bytes::copy_from_slice(chunk)) {
                return refusal;
            }
        }
        reader.finish()
    }

    #[test]
    fn unfinished_counts_the_bytes_of_the_message_not_yet_whole() {
        let two = [frame(&[1; 10]), frame(&[]), frame(&[2; 3])].concat();
        // Whole in one chunk: nothing unfinished.
        assert_eq!(Unfinished::default().push(&two), 0);
        // Byte by byte: the count grows inside each message and falls to 0 at its end.
        let mut unfinished = Unfinished::default();
        let counts: Vec<usize> = two.iter().map(|b| unfinished.push(&[*b])).collect();
        assert_eq!(
            counts[..15],
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0]
        );
        assert_eq!(
            counts[15..20],
            [1, 2, 3, 4, 0],
            "an empty message ends at its prefix"
        );
        assert_eq!(counts[20..], [1, 2, 3, 4, 5, 6, 7, 0]);
        // A message ending inside a chunk, the next one starting in it.
        let mut unfinished = Unfinished::default();
        assert_eq!(unfinished.push(&two[..13]), 13);
        assert_eq!(unfinished.push(&two[13..22]), 2);
        assert_eq!(
            unfinished.ended(),
            2,
            "the first message ended, and the empty second"
        );
        // A prefix announcing more than memory could: counted as it arrives.
        let mut huge = Unfinished::default();
        assert_eq!(huge.push(&[0, 0xff, 0xff, 0xff, 0xff, 7]), 6);
    }

    #[test]
    fn a_hold_takes_what_is_missing_and_gives_back_what_is_over() {
        let budget = Budget::new(100);
        let mut held = Held::new(Arc::clone(&budget));
        assert!(held.hold(60));
        assert_eq!(budget.left(), 40);
        assert!(!held.hold(101), "past the budget");
        assert_eq!(budget.left(), 40, "a refused hold changes nothing");
        assert!(held.hold(10));
        assert_eq!(budget.left(), 90);
        assert!(held.hold(0));
        assert_eq!(budget.left(), 100);
        assert!(held.hold(30));
        drop(held);
        assert_eq!(budget.left(), 100, "given back when dropped");
    }

    #[test]
    fn buffered_bytes_are_charged_to_the_budget_refused_past_it_and_given_back() {
        let budget = Budget::new(100);
        let body = frame(&[7; 150]);
        // In one frame: nothing charged, whatever its size.
        let mut whole = UnaryReader::with_budget(1000, Arc::clone(&budget));
        assert_eq!(whole.push(Bytes::from(body.clone())), None);
        assert_eq!(budget.left(), 100);
        // In pieces: what is held is charged, and the piece past the budget refused.
        let mut pieces = UnaryReader::with_budget(1000, Arc::clone(&budget));
        assert_eq!(pieces.push(Bytes::copy_from_slice(&body[..65])), None);
        assert_eq!(budget.left(), 40);
        assert_eq!(
            pieces.push(Bytes::copy_from_slice(&body[65..])),
            Some(Unary::Overloaded)
        );
        assert_eq!(budget.left(), 40, "a refused piece takes nothing");
        let mut other = UnaryReader::with_budget(1000, Arc::clone(&budget));
        assert_eq!(other.push(Bytes::copy_from_slice(&body[..45])), None);
        assert_eq!(budget.left(), 0);
        drop((pieces, other));
        assert_eq!(budget.left(), 100, "given back when the readers end");
        assert!(matches!(whole.finish(), Unary::Message(m) if m.len() == 150));
    }

    #[test]
    fn a_message_is_read_whole_or_in_pieces_and_a_whole_one_is_not_copied() {
        let body = Bytes::from(frame(b"hello"));
        let mut reader = UnaryReader::new(100);
        assert_eq!(reader.push(body.clone()), None);
        let Unary::Message(message) = reader.finish() else {
            panic!("no message");
        };
        assert_eq!(&message[..], b"hello");
        assert_eq!(
            message.as_ptr(),
            body[PREFIX..].as_ptr(),
            "a slice of the chunk"
        );
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            assert_eq!(
                read(&[a, b], 100),
                Unary::Message(Bytes::from_static(b"hello"))
            );
            let bytes: Vec<&[u8]> = body.chunks(1).collect();
            assert_eq!(
                read(&bytes, 100),
                Unary::Message(Bytes::from_static(b"hello"))
            );
        }
        assert_eq!(read(&[&frame(b"")], 0), Unary::Message(Bytes::new()));
    }

    #[test]
    fn refusals_are_named() {
        let big = frame(&[7; 101]);
        assert_eq!(read(&[&big], 100), Unary::TooLarge(101));
        assert_eq!(
            read(&[&big[..PREFIX]], 100),
            Unary::TooLarge(101),
            "before the message"
        );
        assert_eq!(
            read(&[&big], 101),
            Unary::Message(Bytes::from(vec![7; 101]))
        );
        let mut compressed = frame(b"x");
        compressed[0] = 1;
        assert_eq!(read(&[&compressed], 100), Unary::Malformed(COMPRESSED));
        compressed[0] = 2;
        assert_eq!(read(&[&compressed], 100), Unary::Malformed(BAD_FLAG));
        assert_eq!(read(&[], 100), Unary::Malformed(NO_MESSAGE));
        assert_eq!(read(&[&[0, 0]], 100), Unary::Malformed(TRUNCATED));
        assert_eq!(
            read(&[&frame(b"abc")[..6]], 100),
            Unary::Malformed(TRUNCATED)
        );
        let two = [frame(b"a"), frame(b"b")].concat();
        assert_eq!(read(&[&two], 100), Unary::Malformed(MORE_THAN_ONE));
        assert_eq!(
            read(&[&two[..6], &two[6..]], 100),
            Unary::Malformed(MORE_THAN_ONE)
        );
        assert_eq!(read(&[&two[..7]], 100), Unary::Malformed(MORE_THAN_ONE));
    }

    #[test]
    fn a_huge_announced_length_reserves_nothing() {
        let mut reader = UnaryReader::new(usize::MAX);
        assert_eq!(
            reader.push(Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff, 1])),
            None
        );
        assert!(reader.buf.capacity() < 1024, "{}", reader.buf.capacity());
    }

    #[test]
    fn timeouts_follow_the_grammar() {
        assert_eq!(parse_timeout(b"200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        assert_eq!(
            parse_timeout(b"99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            &b""[..],
            b"m",
            b"123456789m",
            b"+5m",
            b"-5m",
            b"5",
            b"5x",
            b"5 m",
            b" 5m",
        ] {
            assert_eq!(
                parse_timeout(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
