//! A short, stable, non-reversible name for a token, for logs and responses. The raw token is never
//! logged: it is a bearer credential, and log pipelines are read by many.

use sha2::{Digest, Sha256};

/// The first 12 hex digits of the token's SHA-256.
pub fn fingerprint(token: &str) -> String {
    fingerprint_of(&Sha256::digest(token.as_bytes()).into())
}

/// The fingerprint from an already computed SHA-256 of the token.
pub fn fingerprint_of(digest: &[u8; 32]) -> String {
    digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_twelve_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(super::fingerprint("abc"), "ba7816bf8f01");
    }
}
