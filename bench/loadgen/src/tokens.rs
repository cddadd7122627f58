//! Demo tokens for the scenarios: minted with the demo keys (`examples/demo-keys/`) through
//! `stepgate::demo`, in parallel for the distinct-token scenarios, and stored one per line in token
//! files so that several runs can send the same set.

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use jsonwebtoken::Algorithm;
use serde_json::json;
use stepgate::demo::{self, TokenSpec};

/// `examples/demo-keys` of this repository.
pub fn default_keys_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/demo-keys")
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The demo private key for `alg` (RS256 or ES256) and its `kid`.
pub fn demo_key(keys_dir: &Path, alg: Algorithm) -> Result<(Vec<u8>, &'static str), String> {
    let (file, kid) = match alg {
        Algorithm::RS256 => ("demo-rsa-private.pem", demo::DEMO_RSA_KID),
        Algorithm::ES256 => ("demo-ec-private.pem", demo::DEMO_EC_KID),
        other => return Err(format!("no demo key for {other:?}")),
    };
    let path = keys_dir.join(file);
    let pem = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok((pem, kid))
}

/// Signs `spec` now with the demo key for `alg`.
pub fn mint(keys_dir: &Path, spec: &TokenSpec, alg: Algorithm) -> Result<String, String> {
    let (pem, kid) = demo_key(keys_dir, alg)?;
    demo::sign(&spec.claims(unix_now()), &pem, alg, kid)
}

/// `count` distinct valid tokens (subjects `user-0`, `user-1`, … and a `jti` each), signed on
/// `threads` threads. `spec` gives the other claims; `claim_bytes` other than 0 adds a `profile`
/// claim of that many characters ([`distinct_claims`]).
pub fn mint_distinct(
    keys_dir: &Path,
    spec: &TokenSpec,
    alg: Algorithm,
    count: usize,
    claim_bytes: usize,
    threads: usize,
) -> Result<Vec<String>, String> {
    let (pem, kid) = demo_key(keys_dir, alg)?;
    let now = unix_now();
    let threads = threads.clamp(1, count.max(1));
    let chunk = count.div_ceil(threads);
    let parts: Vec<Result<Vec<String>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let pem = &pem;
                scope.spawn(move || {
                    let range = (t * chunk)..((t + 1) * chunk).min(count);
                    range
                        .map(|i| {
                            let claims = distinct_claims(spec, i, now, claim_bytes);
                            demo::sign(&claims, pem, alg, kid)
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a minting thread panicked".into()))
            })
            .collect()
    });
    let mut tokens = Vec::with_capacity(count);
    for part in parts {
        tokens.extend(part?);
    }
    Ok(tokens)
}

/// The claims of the `i`-th distinct token. `claim_bytes` other than 0 adds a claim `profile`, a
/// string of exactly that many ASCII characters, distinct per token (as an identity provider's
/// group lists or custom attributes would be), so that a server keeping whole payloads keeps that
/// much more per token.
pub fn distinct_claims(
    spec: &TokenSpec,
    i: usize,
    now: i64,
    claim_bytes: usize,
) -> serde_json::Value {
    let mut spec = spec.clone();
    spec.subject = format!("user-{i}");
    spec.extra
        .insert("jti".into(), json!(format!("bench-{now}-{i}")));
    if claim_bytes > 0 {
        let unit = format!("group-{i}-of-bench-user;");
        let mut profile = unit.repeat(claim_bytes.div_ceil(unit.len()));
        profile.truncate(claim_bytes);
        spec.extra.insert("profile".into(), json!(profile));
    }
    spec.claims(now)
}

/// Bytes of a token's JSON payload (its middle part, decoded), or `None` when it is not a JWS.
pub fn payload_bytes(token: &str) -> Option<usize> {
    let payload = token.split('.').nth(1)?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .map(|p| p.len())
}

/// The same token with one character of its signature changed: it parses, and its signature does
/// not verify.
pub fn tamper_signature(token: &str) -> String {
    let sig_start = token.rfind('.').map_or(0, |i| i + 1);
    let sig_len = token.len() - sig_start;
    // A character in the middle of the signature (not the last, whose low bits may be padding).
    let at = sig_start + sig_len / 2;
    let mut bytes = token.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("base64url is ASCII")
}

pub fn write_token_file(path: &Path, tokens: &[String]) -> Result<(), String> {
    let mut text = String::with_capacity(tokens.iter().map(|t| t.len() + 1).sum());
    for t in tokens {
        text.push_str(t);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("renaming to {}: {e}", path.display()))
}

/// The tokens of a file, line by line (a file of 100 000 fat tokens is over a gigabyte: it is not
/// read whole first).
pub fn read_token_file(path: &Path) -> Result<Vec<String>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut tokens = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
        let token = line.trim();
        if !token.is_empty() {
            tokens.push(token.to_owned());
        }
    }
    if tokens.is_empty() {
        return Err(format!("{} holds no tokens", path.display()));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_tokens_differ_and_verify_shape() {
        let tokens = mint_distinct(
            &default_keys_dir(),
            &TokenSpec::default(),
            Algorithm::ES256,
            7,
            0,
            3,
        )
        .expect("minting");
        assert_eq!(tokens.len(), 7);
        let mut unique = tokens.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 7);
        assert!(tokens.iter().all(|t| t.split('.').count() == 3));
    }

    #[test]
    fn fat_tokens_carry_their_claim_and_fit_the_servers_limit() {
        let tokens = mint_distinct(
            &default_keys_dir(),
            &TokenSpec::default(),
            Algorithm::RS256,
            2,
            8192,
            2,
        )
        .expect("minting");
        assert_ne!(tokens[0], tokens[1]);
        for token in &tokens {
            let payload = payload_bytes(token).unwrap();
            assert!((8192..9000).contains(&payload), "{payload} bytes of claims");
            // stepgate refuses tokens over limits.max_token_bytes (16 KiB by default).
            assert!(token.len() < 16 * 1024, "{} bytes", token.len());
        }
        let claims = distinct_claims(&TokenSpec::default(), 3, 0, 100);
        assert_eq!(claims["profile"].as_str().unwrap().len(), 100);
        assert!(claims["profile"].as_str().unwrap().starts_with("group-3-"));
        assert!(distinct_claims(&TokenSpec::default(), 3, 0, 0)["profile"].is_null());
        assert_eq!(payload_bytes("aGVhZA.Ym9keQ.c2ln"), Some(4));
        assert_eq!(payload_bytes("not a token"), None);
    }

    #[test]
    fn tampering_changes_only_the_signature() {
        let token = "aGVhZA.Ym9keQ.QUFBQUFB";
        let bad = tamper_signature(token);
        assert_ne!(bad, token);
        assert_eq!(bad.len(), token.len());
        assert!(bad.starts_with("aGVhZA.Ym9keQ."));
        assert_eq!(bad, "aGVhZA.Ym9keQ.QUFBAUFB");
        // A signature character that is already 'A' becomes 'B'.
        assert_eq!(tamper_signature(&bad), "aGVhZA.Ym9keQ.QUFBBUFB");
    }

    #[test]
    fn token_files_round_trip() {
        let dir = std::env::temp_dir().join(format!("loadgen-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.txt");
        let tokens = vec!["a.b.c".to_owned(), "d.e.f".to_owned()];
        write_token_file(&path, &tokens).unwrap();
        assert_eq!(read_token_file(&path).unwrap(), tokens);
        std::fs::write(&path, "\n\n").unwrap();
        assert!(read_token_file(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
