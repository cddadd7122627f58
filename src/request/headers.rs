//! Request headers by lower-case name, read in place from the request that carried them.
//!
//! An Envoy `Check` carries a dozen or more headers, and the engine reads a few of them: the
//! `authorization` header, the identity headers it is about to set, those a CEL condition names.
//! Copying every name and value into a string of its own, and hashing each name into a map, cost
//! more than half a microsecond per `Check`, for values nobody reads. So a [`Headers`] built from a
//! decoded `CheckRequest` keeps the request's bytes (a reference-counted [`Bytes`], not a copy)
//! and each entry as the position of its name and value in them. Only names that had to be folded
//! to lower case, and values joined or repaired, are strings of their own.
//!
//! Entries are kept in the order they arrived, and a lookup scans them: a name that appears twice
//! (Envoy never sends that; a client calling `Check` directly might) resolves to its last value,
//! as in a protobuf map. The scan is linear in the number of entries, with no per-request hashing
//! to defeat: a request with a thousand headers costs a thousand comparisons per lookup, and the
//! engine looks up a handful of names.

use std::{fmt, ops::Range};

use bytes::Bytes;

/// Request headers by lower-case name (see the module docs).
#[derive(Clone, Default)]
pub struct Headers {
    /// The request these headers were decoded from (empty when built from strings).
    buf: Bytes,
    entries: Vec<(Text, Text)>,
}

/// A name or value: in place in [`Headers::buf`] or a string of its own.
#[derive(Clone)]
enum Text {
    At { start: u32, end: u32 },
    Owned(Box<str>),
}

impl Text {
    fn at(range: Range<usize>) -> Self {
        let to_u32 = |n: usize| u32::try_from(n).expect("a gRPC message is under 4 GiB");
        Self::At {
            start: to_u32(range.start),
            end: to_u32(range.end),
        }
    }
}

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Headers that will point into `buf`, with room for `capacity` entries.
    pub(crate) fn in_buffer(buf: Bytes, capacity: usize) -> Self {
        Self {
            buf,
            entries: Vec::with_capacity(capacity),
        }
    }

    /// Adds an entry whose name and value are at these positions of the buffer. A name with an
    /// upper-case letter is folded into a string of its own.
    ///
    /// # Errors
    /// When the name or the value is not UTF-8 (a protobuf `string` must be).
    ///
    /// # Panics
    /// When a range is outside the buffer: a caller bug, never input.
    pub(crate) fn push(
        &mut self,
        name: Range<usize>,
        value: Range<usize>,
    ) -> Result<(), std::str::Utf8Error> {
        check_utf8(&self.buf[name.clone()])?;
        check_utf8(&self.buf[value.clone()])?;
        let name = if has_upper_case(&self.buf[name.clone()]) {
            let name_text = std::str::from_utf8(&self.buf[name])?;
            Text::Owned(name_text.to_ascii_lowercase().into())
        } else {
            Text::at(name)
        };
        self.entries.push((name, Text::at(value)));
        Ok(())
    }

    /// Adds an entry; the name is folded to lower case. A name already present keeps its entry,
    /// and the new one (the last) is what [`Headers::get`] returns.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let mut name = name.into();
        if has_upper_case(name.as_bytes()) {
            name.make_ascii_lowercase();
        }
        self.entries
            .push((Text::Owned(name.into()), Text::Owned(value.into().into())));
    }

    /// The value of `name` (lower case), the last one if it was given twice.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(n, _)| self.is_named(n, name))
            .map(|(_, v)| self.resolve(v))
    }

    /// [`Self::get`] of each of `names` (lower case), in one pass over the entries.
    pub fn get_each<const N: usize>(&self, names: [&str; N]) -> [Option<&str>; N] {
        let mut found = [None; N];
        for (n, v) in self.entries.iter().rev() {
            if let Some(at) = names.iter().position(|name| self.is_named(n, name))
                && found[at].is_none()
            {
                found[at] = Some(self.resolve(v));
            }
        }
        found
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.entries.iter().any(|(n, _)| self.is_named(n, name))
    }

    /// How many entries have this name (lower case).
    pub fn count(&self, name: &str) -> usize {
        self.entries
            .iter()
            .filter(|(n, _)| self.is_named(n, name))
            .count()
    }

    /// Every entry in the order given; where a name repeats, the later entry is the one in force.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|(n, v)| (self.resolve(n), self.resolve(v)))
    }

    /// Every entry's name, as bytes (in place or folded to lower case), without reading values.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().map(|(n, _)| match n {
            Text::At { start, end } => &self.buf[*start as usize..*end as usize],
            Text::Owned(text) => text.as_bytes(),
        })
    }

    /// The number of entries (a name given twice counts twice).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Compares bytes: a name in place was checked to be UTF-8 when it was added.
    fn is_named(&self, text: &Text, name: &str) -> bool {
        match text {
            Text::At { start, end } => &self.buf[*start as usize..*end as usize] == name.as_bytes(),
            Text::Owned(text) => &**text == name,
        }
    }

    fn resolve<'a>(&'a self, text: &'a Text) -> &'a str {
        match text {
            // Checked once more rather than trusted (no `unsafe`): ASCII runs fast, ~30 ns for a
            // 1 KiB token.
            Text::At { start, end } => {
                std::str::from_utf8(&self.buf[*start as usize..*end as usize])
                    .expect("text in place was checked to be UTF-8 when it was added")
            }
            Text::Owned(text) => text,
        }
    }

    /// The entries with each name once, as its last value: what `iter` means as a map.
    fn in_force(&self) -> std::collections::BTreeMap<&str, &str> {
        self.iter().collect()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut headers = Self::new();
        for (name, value) in iter {
            headers.insert(name, value);
        }
        headers
    }
}

impl std::ops::Index<&str> for Headers {
    type Output = str;

    /// # Panics
    /// When the header is absent (like a `HashMap`'s index).
    fn index(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("no header named {name:?}"))
    }
}

/// Equal when they map the same names to the same values.
impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.in_force() == other.in_force()
    }
}

impl Eq for Headers {}

/// Credentials are shown as `<redacted>`: a debug print of a request must not leak its token.
impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.iter().map(|(name, value)| match name {
            "authorization" | "proxy-authorization" | "cookie" => (name, "<redacted>"),
            _ => (name, value),
        });
        f.debug_map().entries(shown).finish()
    }
}

/// Checks `bytes` as UTF-8, as ASCII first: nearly every header is, and `<[u8]>::is_ascii`
/// checks it a word at a time inline, where `str::from_utf8` is a call that walks a short string
/// byte by byte.
///
/// # Errors
/// When `bytes` are not UTF-8.
#[inline]
pub(crate) fn check_utf8(bytes: &[u8]) -> Result<(), std::str::Utf8Error> {
    if bytes.is_ascii() {
        Ok(())
    } else {
        std::str::from_utf8(bytes).map(|_| ())
    }
}

pub(crate) fn has_upper_case(name: &[u8]) -> bool {
    name.iter().any(u8::is_ascii_uppercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One pass finds each name's value as `get` does: the last one given, in any case.
    #[test]
    fn get_each_reads_as_get_does() {
        let mut headers = Headers::new();
        headers.insert("Host", "a.example");
        headers.insert(":method", "GET");
        headers.insert("host", "b.example");
        let names = [":method", "host", ":path"];
        assert_eq!(headers.get_each(names), names.map(|name| headers.get(name)));
        assert_eq!(
            headers.get_each(names),
            [Some("GET"), Some("b.example"), None]
        );
    }

    fn in_place(text: &'static [u8], entries: &[(Range<usize>, Range<usize>)]) -> Headers {
        let mut headers = Headers::in_buffer(Bytes::from_static(text), entries.len());
        for (name, value) in entries {
            headers.push(name.clone(), value.clone()).expect("UTF-8");
        }
        headers
    }

    #[test]
    fn entries_in_place_read_their_bytes() {
        let headers = in_place(b"x-a1x-b22", &[(0..3, 3..4), (4..7, 7..9)]);
        assert_eq!(headers.get("x-a"), Some("1"));
        assert_eq!(headers.get("x-b"), Some("22"));
        assert_eq!(headers.get("x-c"), None);
        assert!(headers.contains_key("x-b"));
        assert_eq!((headers.count("x-a"), headers.count("x-c")), (1, 0));
        assert_eq!(
            headers.iter().collect::<Vec<_>>(),
            [("x-a", "1"), ("x-b", "22")]
        );
        assert_eq!(headers.len(), 2);
    }

    #[test]
    fn the_last_of_a_repeated_name_is_in_force() {
        let mut headers = in_place(b"x-a1", &[(0..3, 3..4)]);
        headers.insert("X-A", "2");
        assert_eq!(headers.get("x-a"), Some("2"));
        assert_eq!(headers.len(), 2);
        assert_eq!(headers, [("x-a", "2")].into_iter().collect());
        assert_ne!(headers, [("x-a", "1")].into_iter().collect());
    }

    #[test]
    fn names_are_folded_to_lower_case() {
        let mut headers = in_place(b"X-Id7", &[(0..4, 4..5)]);
        headers.insert("Content-Type", "text/plain");
        assert_eq!(headers["content-type"], *"text/plain");
        assert_eq!(headers.get("x-id"), Some("7"));
        assert_eq!(headers.get("X-Id"), None);
        assert_eq!(
            format!("{headers:?}"),
            r#"{"x-id": "7", "content-type": "text/plain"}"#
        );
    }

    #[test]
    fn a_debug_print_does_not_show_credentials() {
        let headers: Headers = [
            ("Authorization", "Bearer secret-token"),
            ("cookie", "session=secret"),
            ("x-a", "1"),
        ]
        .into_iter()
        .collect();
        let shown = format!("{headers:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains(r#""authorization": "<redacted>""#),
            "{shown}"
        );
        assert!(shown.contains(r#""x-a": "1""#), "{shown}");
    }

    #[test]
    fn text_in_place_that_is_not_utf8_is_refused() {
        let mut headers = Headers::in_buffer(Bytes::from_static(b"x-a\xff\xfe"), 1);
        assert!(headers.push(0..3, 3..5).is_err());
        assert!(headers.push(3..5, 0..3).is_err());
        assert!(headers.is_empty());
    }
}
