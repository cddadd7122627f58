//! Throwaway signing keys for policy test suites: one per issuer, made when the suite runs,
//! installed as that issuer's only key, and dropped with the run. A suite's tokens are signed with
//! them, so a policy is tested without its identity provider and without any real key.

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::KeySize,
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256,
        RsaKeyPair,
    },
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use crate::identity::{Issuer, jwks::KeySet};

/// The `kid` of every throwaway key.
pub const KID: &str = "stepgate-test";

enum Key {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair, Algorithm),
}

/// One issuer's throwaway key.
pub struct Signer {
    key: Key,
    rng: SystemRandom,
}

impl Signer {
    /// A key of an algorithm `issuer` accepts (ES256, else RS256, else PS256), installed as its
    /// only key.
    pub fn install(issuer: &Issuer) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let accepts = |alg| issuer.algorithms.contains(&alg);
        let key = if accepts(Algorithm::ES256) {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|_| "cannot make a P-256 key".to_owned())?;
            Key::Ec(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                    .map_err(|_| "cannot read the P-256 key".to_owned())?,
            )
        } else if let Some(alg) = [Algorithm::RS256, Algorithm::PS256]
            .into_iter()
            .find(|a| accepts(*a))
        {
            let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048)
                .map_err(|_| "cannot make an RSA key".to_owned())?;
            Key::Rsa(pair, alg)
        } else {
            return Err(format!(
                "issuer {} accepts only {:?}: the test runner signs ES256, RS256 or PS256",
                issuer.id, issuer.algorithms
            ));
        };
        let signer = Self { key, rng };
        let jwks = json!({ "keys": [signer.jwk()] }).to_string();
        let (keys, _) = KeySet::parse(jwks.as_bytes()).map_err(|e| e.0)?;
        issuer.set_keys(keys);
        Ok(signer)
    }

    fn alg(&self) -> Algorithm {
        match &self.key {
            Key::Ec(_) => Algorithm::ES256,
            Key::Rsa(_, alg) => *alg,
        }
    }

    fn jwk(&self) -> Value {
        let alg = format!("{:?}", self.alg());
        match &self.key {
            Key::Ec(pair) => {
                // The uncompressed point: 0x04, x, y.
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": KID, "use": "sig", "alg": alg,
                       "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65])})
            }
            Key::Rsa(pair, _) => {
                let public = pair.public_key();
                json!({"kty": "RSA", "kid": KID, "use": "sig", "alg": alg,
                       "n": B64.encode(public.modulus().big_endian_without_leading_zero()),
                       "e": B64.encode(public.exponent().big_endian_without_leading_zero())})
            }
        }
    }

    /// A compact JWS of `claims` whose header says `typ` (none when empty); with `forge`, its
    /// signature is another message's (a token no key of the issuer signed).
    pub fn sign(&self, claims: &Value, typ: &str, forge: bool) -> Result<String, String> {
        let mut header = json!({"alg": format!("{:?}", self.alg()), "kid": KID});
        if !typ.is_empty() {
            header["typ"] = json!(typ);
        }
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let message = if forge {
            format!("{input}.forged")
        } else {
            input.clone()
        };
        let signature = match &self.key {
            Key::Ec(pair) => pair
                .sign(&self.rng, message.as_bytes())
                .map_err(|_| "cannot sign".to_owned())?
                .as_ref()
                .to_vec(),
            Key::Rsa(pair, alg) => {
                let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = match alg {
                    Algorithm::PS256 => &RSA_PSS_SHA256,
                    _ => &RSA_PKCS1_SHA256,
                };
                let mut out = vec![0; pair.public_modulus_len()];
                pair.sign(padding, &self.rng, message.as_bytes(), &mut out)
                    .map_err(|_| "cannot sign".to_owned())?;
                out
            }
        };
        Ok(format!("{input}.{}", B64.encode(signature)))
    }
}
