//! Identity: who is calling, established from the bearer token.
//!
//! `bearer` finds the token, `token` verifies it against an issuer's keys (`jwks`, `issuer`),
//! `claims` reads the principal, `keys` loads and refreshes key sets in the background. Nothing here
//! knows about rules or outcomes.

pub mod bearer;
pub mod cache;
pub mod claims;
pub mod fingerprint;
pub mod intern;
pub mod issuer;
pub mod jwks;
pub mod keys;
pub mod san;
pub mod segments;
pub mod thumbprint;
pub mod token;

pub use bearer::{Credential, CredentialProblem};
pub use cache::TokenCache;
pub use claims::Principal;
pub use fingerprint::{fingerprint, fingerprint_of, sha256_hex};
pub use issuer::{ChallengeStyle, EntraChallenge, Issuer, Issuers, KeySource};
pub use thumbprint::{CertificateProblem, ClientCertificate, Presented, Thumbprint};
pub use token::{KeepClaims, TokenError, VerifiedToken, verify};
