//! Human durations in the policy file: `90s`, `15m`, `1h30m`, `2d`, or a bare number of seconds.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, de};

/// A duration read from the policy file. Kept as whole seconds: every duration stepgate compares
/// against a JWT claim (`auth_time`, `exp`) is in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub u64);

impl Seconds {
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s == 0 {
            return write!(f, "0s");
        }
        let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
        for (n, unit) in [(d, "d"), (h, "h"), (m, "m"), (sec, "s")] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

/// Parses `15m`, `1h30m`, `45s`, `2d` or `900` into whole seconds.
pub fn parse(text: &str) -> Result<Seconds, String> {
    let millis = parse_millis(text, "15m, 1h30m or 90s")?;
    if millis % 1000 != 0 {
        return Err(format!("expected whole seconds, got {:?}", text.trim()));
    }
    Ok(Seconds(millis / 1000))
}

/// Parses a duration that may be shorter than a second: `250ms`, `1s500ms`, `15m`, or a bare number
/// of seconds.
pub fn parse_span(text: &str) -> Result<Duration, String> {
    parse_millis(text, "250ms, 30s or 5m").map(Duration::from_millis)
}

/// Milliseconds; an error names `examples` of what the field takes (whole seconds or not).
fn parse_millis(text: &str, examples: &str) -> Result<u64, String> {
    let text = text.trim();
    let bad = || format!("expected a duration like {examples}, got {text:?}");
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = text.parse::<u64>() {
        return n.checked_mul(1000).ok_or_else(bad);
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit = match ch {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// A duration read from the policy file with millisecond precision (timeouts, waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Span;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 250ms, 30s or 5m")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Span, E> {
                Ok(Span(Duration::from_secs(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Span, E> {
                u64::try_from(v)
                    .map(|v| Span(Duration::from_secs(v)))
                    .map_err(|_| E::custom(format!("expected a non-negative duration, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Span, E> {
                parse_span(v).map(Span).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Seconds;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like 15m, 1h30m or 90s")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                Ok(Seconds(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                u64::try_from(v)
                    .map(Seconds)
                    .map_err(|_| E::custom(format!("expected a non-negative duration, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field in whole seconds does not suggest what it refuses (`250ms`); one that takes
    /// milliseconds says so.
    #[test]
    fn an_error_gives_examples_the_field_takes() {
        assert_eq!(
            parse("fifteen"),
            Err("expected a duration like 15m, 1h30m or 90s, got \"fifteen\"".into())
        );
        assert_eq!(
            parse_span("soon"),
            Err("expected a duration like 250ms, 30s or 5m, got \"soon\"".into())
        );
    }

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("15m"), Ok(Seconds(900)));
        assert_eq!(parse("1h30m"), Ok(Seconds(5400)));
        assert_eq!(parse("2d"), Ok(Seconds(172_800)));
        assert_eq!(parse("45s"), Ok(Seconds(45)));
        assert_eq!(parse("300"), Ok(Seconds(300)));
    }

    #[test]
    fn rejects_words_and_dangling_numbers() {
        assert!(parse("fifteen").unwrap_err().contains("\"fifteen\""));
        assert!(parse("15").is_ok());
        assert!(parse("1h30").is_err());
        assert!(parse("").is_err());
        assert!(parse("-5m").is_err());
        assert!(parse("99999999999999999999d").is_err());
    }

    #[test]
    fn spans_take_milliseconds() {
        assert_eq!(parse_span("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_span("1s500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_span("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_span("3"), Ok(Duration::from_secs(3)));
        assert!(parse("250ms").unwrap_err().contains("whole seconds"));
        assert!(parse_span("5x").is_err());
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(Seconds(5400).to_string(), "1h30m");
        assert_eq!(Seconds(900).to_string(), "15m");
        assert_eq!(Seconds(0).to_string(), "0s");
    }
}
