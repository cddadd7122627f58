//! The cost of one signature verification, measured the way stepgate verifies: the key from the
//! demo JWKS parsed once by stepgate's own key-set code (`KeySet::parse`, an aws-lc
//! `ParsedPublicKey`), then `PreparedKey::verify` on a demo token, as stepgate's token check calls it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};
use stepgate::{
    demo::{self, TokenSpec},
    identity::jwks::{KeySet, VerificationKey},
};

use crate::tokens;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyCost {
    pub algorithm: String,
    pub iterations: u64,
    pub seconds: f64,
    pub us_per_verify: f64,
}

/// The JWKS key with `kid` from `<keys_dir>/jwks.json`, parsed as stepgate parses key sets.
pub fn jwks_key(keys_dir: &Path, kid: &str) -> Result<VerificationKey, String> {
    let path = keys_dir.join("jwks.json");
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (set, _) = KeySet::parse(&bytes).map_err(|e| e.0)?;
    set.find(Some(kid))
        .cloned()
        .ok_or_else(|| format!("no key {kid} in {}", path.display()))
}

/// Verifies one demo token over and over for about `duration` (after a short warm-up).
pub fn measure(keys_dir: &Path, alg: Algorithm, duration: Duration) -> Result<VerifyCost, String> {
    let kid = match alg {
        Algorithm::RS256 => demo::DEMO_RSA_KID,
        Algorithm::ES256 => demo::DEMO_EC_KID,
        other => return Err(format!("no demo key for {other:?}")),
    };
    let key = jwks_key(keys_dir, kid)?;
    let prepared = key
        .prepared
        .clone()
        .filter(|p| p.alg == alg)
        .ok_or_else(|| format!("stepgate does not prepare {kid} for {alg:?}"))?;
    let token = tokens::mint(keys_dir, &TokenSpec::default(), alg)?;
    let (message, signature) = token
        .rsplit_once('.')
        .ok_or("a token without a signature")?;
    let once = || prepared.verify(message.as_bytes(), signature);
    if once() != Some(true) {
        return Err("the demo token does not verify".into());
    }
    let warm = Instant::now();
    while warm.elapsed() < duration / 10 {
        std::hint::black_box(once());
    }
    let start = Instant::now();
    let mut iterations = 0u64;
    // Batches of 64 keep the clock reads out of the measurement.
    while start.elapsed() < duration {
        for _ in 0..64 {
            std::hint::black_box(once());
        }
        iterations += 64;
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(VerifyCost {
        algorithm: format!("{alg:?}"),
        iterations,
        seconds,
        us_per_verify: seconds * 1e6 / iterations as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_measurement_verifies_demo_tokens() {
        for alg in [Algorithm::RS256, Algorithm::ES256] {
            let cost =
                measure(&tokens::default_keys_dir(), alg, Duration::from_millis(20)).unwrap();
            assert!(cost.iterations >= 64, "{cost:?}");
            assert!(cost.us_per_verify > 0.0 && cost.us_per_verify < 100_000.0);
        }
    }
}
