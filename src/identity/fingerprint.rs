//! A short, stable, non-reversible name for a token, for logs and responses. The raw token is never
//! logged: it is a bearer credential, and log pipelines are read by many.

use sha2::{Digest, Sha256};

/// The first 12 hex digits of the token's SHA-256.
pub fn fingerprint(token: &str) -> String {
    fingerprint_of(&Sha256::digest(token.as_bytes()).into())
}

/// The first `digits` hex digits of `value`'s SHA-256 (at most 64).
pub fn sha256_hex(value: &str, digits: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    Sha256::digest(value.as_bytes())
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0x0f)]])
        .take(digits)
        .map(char::from)
        .collect()
}

/// The fingerprint from an already computed SHA-256 of the token (one per decision: written
/// without the formatting machinery).
pub fn fingerprint_of(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(12);
    for byte in &digest[..6] {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_twelve_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(super::fingerprint("abc"), "ba7816bf8f01");
    }

    #[test]
    fn every_nibble_is_a_lower_case_hex_digit() {
        let mut digest = [0u8; 32];
        digest[..6].copy_from_slice(&[0x00, 0x0f, 0xf0, 0xa5, 0x5a, 0xff]);
        assert_eq!(super::fingerprint_of(&digest), "000ff0a55aff");
    }
}
