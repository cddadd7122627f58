//! The parts of an Envoy `CheckRequest` that stepgate reads, found in place in the request's bytes.
//!
//! envoy-types' `CheckRequest` decodes everything Envoy sends: the destination, the request time,
//! id, scheme, protocol and size, metadata, the TLS session. Every string becomes its own
//! allocation, and the header map is hashed with SipHash while it is built. The engine reads a
//! few of those fields. This decoder walks the protobuf wire format once, skips every other field
//! without looking inside, and keeps the fields it reads as positions in the request's buffer
//! (the gRPC frame, a reference-counted [`Bytes`], never copied): the headers become a
//! [`Headers`] that reads names and values where they are.
//!
//! What it follows from protobuf's rules, like any conforming decoder:
//! - a scalar or string field given twice keeps its last value; an embedded message given twice
//!   is merged (its fields are read in order into the same place);
//! - a `oneof` keeps its last member (`Address`: a later `pipe` replaces a socket address);
//! - a map entry is a message `{key = 1, value = 2}`, either part may be absent (empty);
//! - a field not read is skipped without being checked, so a request whose unread fields are
//!   malformed inside (say, non-UTF-8 bytes in `destination.principal`) is decided on the fields
//!   that are read. Its framing (tags, lengths) must still be sound.
//!
//! Groups (wire types 3 and 4, deprecated since proto2, absent from these protos) are refused.
//!
//! Only a frame that is not protobuf is an error (a gRPC `INVALID_ARGUMENT`, which Envoy treats
//! as the authorizer failing). Content that protobuf frames correctly but that cannot be decided
//! on is a [`RequestProblem`] the engine answers with a denial, so that `failure_mode_allow`
//! never lets it through: a field read as a `string` that is not UTF-8, and headers past the
//! [`HeaderLimits`]. Past a limit, entries are counted but no longer kept, so that memory stays
//! bounded by the limits rather than by the frame (a 4 MiB frame of 2-byte header entries would
//! otherwise cost about 16 times its size).
//! The field numbers are those of `envoy/service/auth/v3/external_auth.proto`,
//! `envoy/service/auth/v3/attribute_context.proto`, `envoy/config/core/v3/address.proto` and
//! `envoy/config/core/v3/base.proto`. The tests encode envoy-types' own messages, with every field
//! set, and compare what both decoders read.

use std::{cell::Cell, ops::Range};

use crate::request::{HeaderLimits, Headers, RequestProblem};
use bytes::Bytes;

/// `context_extensions` entries kept: Envoy's come from route configuration (a handful); more is
/// a caller that is not Envoy.
const MAX_CONTEXT_EXTENSIONS: usize = 64;

/// The fields of a `CheckRequest` that stepgate reads.
#[derive(Debug, Clone, Default)]
pub struct CheckRequest {
    buf: Bytes,
    /// `attributes.request.http`, when present.
    pub http: Option<HttpRequest>,
    /// `attributes.source`, when present.
    pub source: Option<Peer>,
    /// `attributes.context_extensions`, entries in the order given.
    context_extensions: Vec<(Range<usize>, Range<usize>)>,
    /// Why the content cannot be decided on, if it cannot.
    pub problem: Option<RequestProblem>,
    headers: HeaderTally,
}

/// Header entries and bytes seen, against the limits.
#[derive(Debug, Clone, Copy, Default)]
struct HeaderTally {
    limits: HeaderLimits,
    count: usize,
    bytes: usize,
}

impl HeaderTally {
    /// Counts one entry of `bytes`; whether it is still within the limits (and so kept).
    fn admit(&mut self, bytes: usize) -> bool {
        self.count += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        self.count <= self.limits.max_count && self.bytes <= self.limits.max_bytes
    }

    fn problem(&self) -> Option<RequestProblem> {
        let limits = self.limits;
        if self.count > limits.max_count {
            Some(RequestProblem::TooManyHeaders {
                count: self.count,
                limit: limits.max_count,
            })
        } else if self.bytes > limits.max_bytes {
            Some(RequestProblem::HeadersTooLarge {
                bytes: self.bytes,
                limit: limits.max_bytes,
            })
        } else {
            None
        }
    }
}

/// `AttributeContext.HttpRequest`: strings are positions in the request's buffer.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    method: Range<usize>,
    path: Range<usize>,
    host: Range<usize>,
    /// The `headers` map, names folded to lower case.
    pub headers: Headers,
    /// `header_map.headers`, set instead of `headers` when Envoy's `encode_raw_headers` is on.
    raw_headers: Vec<RawHeader>,
}

/// One `envoy.config.core.v3.HeaderValue` of `header_map`.
#[derive(Debug, Clone, Default)]
struct RawHeader {
    key: Range<usize>,
    value: Range<usize>,
    /// Bytes, not necessarily UTF-8.
    raw_value: Range<usize>,
}

/// `AttributeContext.Peer`.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    address: Address,
    principal: Range<usize>,
    /// `certificate`: the peer's certificate, URL-encoded PEM (Envoy's
    /// `include_peer_certificate`).
    certificate: Range<usize>,
}

/// `envoy.config.core.v3.Address`, a oneof of which only the socket address is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Address {
    #[default]
    Unset,
    /// `socket_address.address`.
    Socket(Range<usize>),
    /// `pipe` or `envoy_internal_address`.
    Other,
}

/// A raw header as the proxy sent it.
pub struct RawHeaderRef<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub raw_value: &'a [u8],
}

impl CheckRequest {
    /// Reads a serialized `CheckRequest`, keeping headers within `limits`. Content that cannot
    /// be decided on is noted in [`CheckRequest::problem`], not refused.
    ///
    /// # Errors
    /// When the bytes are not a well-formed protobuf message; the message names the field.
    pub fn decode(buf: Bytes, limits: HeaderLimits) -> Result<Self, DecodeError> {
        let mut request = Self {
            buf,
            headers: HeaderTally {
                limits,
                ..HeaderTally::default()
            },
            ..Self::default()
        };
        let buf = request.buf.clone();
        let not_utf8 = Cell::new(None);
        let mut reader = Reader::new(&buf, 0..buf.len(), &not_utf8);
        while let Some((field, wire)) = reader.key()? {
            match field {
                1 => {
                    let attributes = reader.message(wire, "attributes")?;
                    request.attributes(attributes)?;
                }
                _ => reader.skip(wire)?,
            }
        }
        request.problem = not_utf8
            .get()
            .map(RequestProblem::NotUtf8)
            .or(request.problem.take())
            .or_else(|| request.headers.problem());
        Ok(request)
    }

    /// `AttributeContext`.
    fn attributes(&mut self, mut reader: Reader<'_>) -> Result<(), DecodeError> {
        while let Some((field, wire)) = reader.key()? {
            match field {
                1 => {
                    let peer = reader.message(wire, "attributes.source")?;
                    read_peer(peer, self.source.get_or_insert_default())?;
                }
                4 => {
                    let request = reader.message(wire, "attributes.request")?;
                    self.request(request)?;
                }
                10 => {
                    const FIELD: &str = "attributes.context_extensions";
                    let entry = reader.message(wire, FIELD)?;
                    let (key, value) = map_entry(entry, FIELD, Reader::string)?;
                    if self.context_extensions.len() < MAX_CONTEXT_EXTENSIONS {
                        self.context_extensions.push((key, value));
                    } else {
                        self.problem
                            .get_or_insert(RequestProblem::TooManyEntries(FIELD));
                    }
                }
                _ => reader.skip(wire)?,
            }
        }
        Ok(())
    }

    /// `AttributeContext.Request`: only `http`.
    fn request(&mut self, mut reader: Reader<'_>) -> Result<(), DecodeError> {
        while let Some((field, wire)) = reader.key()? {
            match field {
                2 => {
                    let http = reader.message(wire, "attributes.request.http")?;
                    let buf = self.buf.clone();
                    let target = self.http.get_or_insert_with(|| HttpRequest {
                        headers: Headers::in_buffer(buf, 16),
                        ..HttpRequest::default()
                    });
                    read_http(http, target, &mut self.headers)?;
                }
                _ => reader.skip(wire)?,
            }
        }
        Ok(())
    }

    fn text(&self, range: &Range<usize>) -> &str {
        // Every range kept was checked to be UTF-8 by `Reader::string` (one that was not is kept
        // as an empty range, and noted).
        std::str::from_utf8(&self.buf[range.clone()]).unwrap_or_default()
    }

    pub fn method(&self) -> &str {
        self.http.as_ref().map_or("", |h| self.text(&h.method))
    }

    pub fn path(&self) -> &str {
        self.http.as_ref().map_or("", |h| self.text(&h.path))
    }

    pub fn host(&self) -> &str {
        self.http.as_ref().map_or("", |h| self.text(&h.host))
    }

    /// `header_map.headers`, in the order given.
    pub fn raw_headers(&self) -> impl Iterator<Item = RawHeaderRef<'_>> {
        self.http
            .iter()
            .flat_map(|h| &h.raw_headers)
            .map(|raw| RawHeaderRef {
                key: self.text(&raw.key),
                value: self.text(&raw.value),
                raw_value: &self.buf[raw.raw_value.clone()],
            })
    }

    pub fn raw_header_count(&self) -> usize {
        self.http.as_ref().map_or(0, |h| h.raw_headers.len())
    }

    /// The source's IP when its address is a socket address.
    pub fn source_address(&self) -> Option<&str> {
        match &self.source.as_ref()?.address {
            Address::Socket(ip) => Some(self.text(ip)),
            Address::Unset | Address::Other => None,
        }
    }

    pub fn source_principal(&self) -> Option<&str> {
        self.source.as_ref().map(|p| self.text(&p.principal))
    }

    /// The source's certificate (URL-encoded PEM); `None` when absent or empty.
    pub fn source_certificate(&self) -> Option<&str> {
        self.source
            .as_ref()
            .map(|p| self.text(&p.certificate))
            .filter(|c| !c.is_empty())
    }

    /// [`Self::source_certificate`] where the frame holds it (no copy).
    pub fn source_certificate_bytes(&self) -> Option<Bytes> {
        self.source
            .as_ref()
            .filter(|p| !p.certificate.is_empty())
            .map(|p| self.buf.slice(p.certificate.clone()))
    }

    /// `context_extensions` in the order given (a repeated key: the last is in force).
    pub fn context_extensions(&self) -> impl Iterator<Item = (&str, &str)> {
        self.context_extensions
            .iter()
            .map(|(k, v)| (self.text(k), self.text(v)))
    }
}

/// `AttributeContext.Peer`: `address`, `principal` and `certificate`.
fn read_peer(mut reader: Reader<'_>, peer: &mut Peer) -> Result<(), DecodeError> {
    while let Some((field, wire)) = reader.key()? {
        match field {
            1 => {
                let address = reader.message(wire, "attributes.source.address")?;
                read_address(address, &mut peer.address)?;
            }
            4 => peer.principal = reader.string(wire, "attributes.source.principal")?,
            5 => peer.certificate = reader.string(wire, "attributes.source.certificate")?,
            _ => reader.skip(wire)?,
        }
    }
    Ok(())
}

/// `envoy.config.core.v3.Address`: `socket_address` = 1, `pipe` = 2, `envoy_internal_address` = 3.
fn read_address(mut reader: Reader<'_>, address: &mut Address) -> Result<(), DecodeError> {
    while let Some((field, wire)) = reader.key()? {
        match field {
            1 => {
                let mut socket =
                    reader.message(wire, "attributes.source.address.socket_address")?;
                // The same member again merges into it; another member before it is replaced.
                let mut ip = match std::mem::take(address) {
                    Address::Socket(ip) => ip,
                    Address::Unset | Address::Other => 0..0,
                };
                while let Some((field, wire)) = socket.key()? {
                    match field {
                        2 => {
                            ip = socket
                                .string(wire, "attributes.source.address.socket_address.address")?;
                        }
                        _ => socket.skip(wire)?,
                    }
                }
                *address = Address::Socket(ip);
            }
            2 | 3 => {
                reader.message(wire, "attributes.source.address")?;
                *address = Address::Other;
            }
            _ => reader.skip(wire)?,
        }
    }
    Ok(())
}

/// `AttributeContext.HttpRequest`: `method` = 2, `headers` = 3, `path` = 4, `host` = 5,
/// `header_map` = 13. Header entries of both kinds count against one tally.
fn read_http(
    mut reader: Reader<'_>,
    http: &mut HttpRequest,
    tally: &mut HeaderTally,
) -> Result<(), DecodeError> {
    const HEADERS: &str = "attributes.request.http.headers";
    while let Some((field, wire)) = reader.key()? {
        match field {
            2 => http.method = reader.string(wire, "attributes.request.http.method")?,
            3 => {
                let entry = reader.message(wire, HEADERS)?;
                // Bytes here: `Headers::push` checks them as UTF-8 (once).
                let (key, value) = map_entry(entry, HEADERS, Reader::bytes)?;
                if tally.admit(key.len() + value.len()) && http.headers.push(key, value).is_err() {
                    reader.not_utf8(HEADERS);
                }
            }
            4 => http.path = reader.string(wire, RequestProblem::PATH_FIELD)?,
            5 => http.host = reader.string(wire, "attributes.request.http.host")?,
            13 => {
                let mut map = reader.message(wire, "attributes.request.http.header_map")?;
                while let Some((field, wire)) = map.key()? {
                    match field {
                        1 => {
                            let value = map.message(wire, "header_map.headers")?;
                            let raw = raw_header(value)?;
                            let bytes = raw.key.len() + raw.value.len() + raw.raw_value.len();
                            if tally.admit(bytes) {
                                http.raw_headers.push(raw);
                            }
                        }
                        _ => map.skip(wire)?,
                    }
                }
            }
            _ => reader.skip(wire)?,
        }
    }
    Ok(())
}

/// `envoy.config.core.v3.HeaderValue`: `key` = 1, `value` = 2, `raw_value` = 3 (bytes).
fn raw_header(mut reader: Reader<'_>) -> Result<RawHeader, DecodeError> {
    let mut raw = RawHeader::default();
    while let Some((field, wire)) = reader.key()? {
        match field {
            1 => raw.key = reader.string(wire, "header_map.headers.key")?,
            2 => raw.value = reader.string(wire, "header_map.headers.value")?,
            3 => raw.raw_value = reader.bytes(wire, "header_map.headers.raw_value")?,
            _ => reader.skip(wire)?,
        }
    }
    Ok(raw)
}

/// A `map<string, string>` entry: `key` = 1, `value` = 2, each read with `read`
/// (`Reader::string` or `Reader::bytes`).
fn map_entry<'a>(
    mut reader: Reader<'a>,
    map: &'static str,
    read: fn(&mut Reader<'a>, Wire, &'static str) -> Result<Range<usize>, DecodeError>,
) -> Result<(Range<usize>, Range<usize>), DecodeError> {
    let (mut key, mut value) = (0..0, 0..0);
    while let Some((field, wire)) = reader.key()? {
        match field {
            1 => key = read(&mut reader, wire, map)?,
            2 => value = read(&mut reader, wire, map)?,
            _ => reader.skip(wire)?,
        }
    }
    Ok((key, value))
}

/// Why a `CheckRequest` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CheckRequest is not valid protobuf: {0}")]
// Boxed: a one-word error keeps every `Result` of the reader in registers (a `String` made them
// go through the stack, with store-forwarding stalls on every field).
#[allow(
    clippy::box_collection,
    reason = "one word instead of three: the point is the size of the error, not the string"
)]
pub struct DecodeError(Box<String>);

/// Built only on the error path, so kept out of line.
impl DecodeError {
    #[cold]
    fn bad_key(key: u64) -> Self {
        match key & 7 {
            3 | 4 => Self::new(format!("field {}: groups are not used here", key >> 3)),
            0..=2 | 5 => Self::new(format!("invalid field number {}", key >> 3)),
            wire => Self::new(format!("field {}: invalid wire type {wire}", key >> 3)),
        }
    }

    #[cold]
    fn past_end(len: u64) -> Self {
        Self::new(format!("length {len} runs past the end of its message"))
    }

    #[cold]
    fn wire_type(field: &str, wire: Wire) -> Self {
        Self::new(format!(
            "{field}: wire type {wire:?}, expected length-delimited"
        ))
    }

    #[cold]
    fn message(text: &str) -> Self {
        Self::new(text.to_owned())
    }

    fn new(text: String) -> Self {
        Self(Box::new(text))
    }
}

/// Protobuf wire types (groups, 3 and 4, are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

/// Reads one message's fields: `rest` is what is left of it, `at` where `rest` starts in the
/// whole request (ranges handed out are positions in the request). `not_utf8`, shared by the
/// readers of one request, names the first field read as a string that was not UTF-8.
struct Reader<'a> {
    rest: &'a [u8],
    at: usize,
    not_utf8: &'a Cell<Option<&'static str>>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], range: Range<usize>, not_utf8: &'a Cell<Option<&'static str>>) -> Self {
        Self {
            at: range.start,
            rest: &buf[range],
            not_utf8,
        }
    }

    /// Notes `field` as not UTF-8 (unless an earlier field was).
    #[cold]
    fn not_utf8(&self, field: &'static str) {
        if self.not_utf8.get().is_none() {
            self.not_utf8.set(Some(field));
        }
    }

    #[inline]
    fn advance(&mut self, n: usize) {
        self.rest = &self.rest[n..];
        self.at += n;
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    #[inline]
    fn key(&mut self) -> Result<Option<(u32, Wire)>, DecodeError> {
        if self.rest.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint,
            1 => Wire::Fixed64,
            2 => Wire::Len,
            5 => Wire::Fixed32,
            _ => return Err(DecodeError::bad_key(key)),
        };
        match u32::try_from(key >> 3) {
            Ok(field) if field != 0 => Ok(Some((field, wire))),
            _ => Err(DecodeError::bad_key(key)),
        }
    }

    /// Nearly every key and length fits in one byte. Always inlined: a `CheckRequest` has some
    /// seventy keys and lengths, and the call cost more than the reading.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        match self.rest.first() {
            Some(&byte) if byte < 0x80 => {
                self.advance(1);
                Ok(u64::from(byte))
            }
            _ => self.long_varint(),
        }
    }

    fn long_varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (i, &byte) in self.rest.iter().take(10).enumerate() {
            // The tenth byte holds only the top bit of a u64.
            if i == 9 && byte > 1 {
                return Err(DecodeError::message("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.advance(i + 1);
                return Ok(value);
            }
        }
        Err(DecodeError::message("truncated varint"))
    }

    /// A length-delimited field: its position in the request and its bytes.
    #[inline]
    fn len_delimited(&mut self) -> Result<(Range<usize>, &'a [u8]), DecodeError> {
        let len = self.varint()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= self.rest.len())
            .ok_or_else(|| DecodeError::past_end(len))?;
        let (bytes, rest) = self.rest.split_at(len);
        let start = self.at;
        self.rest = rest;
        self.at += len;
        Ok((start..start + len, bytes))
    }

    /// An embedded message field: a reader over its bytes.
    #[inline]
    fn message(&mut self, wire: Wire, field: &str) -> Result<Reader<'a>, DecodeError> {
        let (range, bytes) = self.len_delimited_field(wire, field)?;
        Ok(Reader {
            rest: bytes,
            at: range.start,
            not_utf8: self.not_utf8,
        })
    }

    /// A `string` field: its range, checked to be UTF-8. One that is not is noted and read as
    /// empty: the request is then answered as unusable, whatever else it holds.
    #[inline]
    fn string(&mut self, wire: Wire, field: &'static str) -> Result<Range<usize>, DecodeError> {
        let (range, bytes) = self.len_delimited_field(wire, field)?;
        if crate::request::check_utf8(bytes).is_err() {
            self.not_utf8(field);
            return Ok(range.start..range.start);
        }
        Ok(range)
    }

    /// A `bytes` field: its range.
    #[inline]
    fn bytes(&mut self, wire: Wire, field: &'static str) -> Result<Range<usize>, DecodeError> {
        Ok(self.len_delimited_field(wire, field)?.0)
    }

    /// A field read as length-delimited, which it must then be.
    #[inline]
    fn len_delimited_field(
        &mut self,
        wire: Wire,
        field: &str,
    ) -> Result<(Range<usize>, &'a [u8]), DecodeError> {
        if wire != Wire::Len {
            return Err(DecodeError::wire_type(field, wire));
        }
        self.len_delimited()
    }

    fn skip(&mut self, wire: Wire) -> Result<(), DecodeError> {
        let width = match wire {
            Wire::Varint => return self.varint().map(drop),
            Wire::Len => return self.len_delimited().map(drop),
            Wire::Fixed64 => 8,
            Wire::Fixed32 => 4,
        };
        if self.rest.len() < width {
            return Err(DecodeError::message("truncated fixed-width field"));
        }
        self.advance(width);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
