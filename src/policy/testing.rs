//! Test support: policies compiled from YAML with the bundled demo keys installed.

use std::path::Path;

use super::Policy;
use crate::identity::jwks::KeySet;

/// The bundled demo policy, `examples/stepgate.yaml`.
pub const DEMO_POLICY: &str = include_str!("../../examples/stepgate.yaml");

/// A file under `examples/demo-keys/`.
pub fn demo_file(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/demo-keys")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Compiles policy YAML (relative key files resolve under `examples/`) and installs the demo key
/// set for every issuer, synchronously.
pub fn compile_policy(yaml: &str) -> Policy {
    let file = crate::config::parse(yaml).unwrap_or_else(|e| panic!("policy does not parse: {e}"));
    let policy = super::compile(
        &file,
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")),
    )
    .unwrap_or_else(|e| panic!("policy does not compile: {e}"));
    let jwks = demo_file("jwks.json");
    for issuer in policy.issuers.iter() {
        let (set, notes) = KeySet::parse(&jwks).expect("the demo key set parses");
        assert!(notes.is_empty(), "demo keys skipped: {notes:?}");
        assert_eq!(set.len(), 2, "the demo set holds one RSA and one EC key");
        issuer.set_keys(set);
    }
    policy
}
