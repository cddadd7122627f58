//! Sizes in the policy file: `128MiB`, `512KiB`, `1GiB`, `64MB`, or a bare number of bytes.

use std::fmt;

use serde::{Deserialize, Deserializer, de};

/// A number of bytes read from the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// Parses `128MiB`, `64MB`, `4096` (bytes), … Binary units (`KiB`, `MiB`, `GiB`) are powers of
/// 1024, decimal ones (`KB`, `MB`, `GB`) powers of 1000.
pub fn parse(text: &str) -> Result<ByteSize, String> {
    let text = text.trim();
    let bad = || format!("expected a size like 128MiB, 512KiB or 1GiB, got {text:?}");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let unit = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).map(ByteSize).ok_or_else(bad)
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like 128MiB, 512KiB or 1GiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("expected a non-negative size, got {v}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!(parse("128MiB"), Ok(ByteSize(128 << 20)));
        assert_eq!(parse("512KiB"), Ok(ByteSize(512 << 10)));
        assert_eq!(parse("1GiB"), Ok(ByteSize(1 << 30)));
        assert_eq!(parse("64MB"), Ok(ByteSize(64_000_000)));
        assert_eq!(parse("4096"), Ok(ByteSize(4096)));
        assert_eq!(parse(" 10 MiB "), Ok(ByteSize(10 << 20)));
        assert_eq!(ByteSize(128 << 20).to_string(), "128MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn refuses_other_units_and_overflow() {
        for bad in [
            "128M",
            "1.5GiB",
            "MiB",
            "",
            "-1",
            "99999999999999999999GiB",
            "1 TiB",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse("12mib").unwrap_err().contains("\"12mib\""));
    }
}
