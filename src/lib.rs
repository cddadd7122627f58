//! stepgate: step-up authentication decisions for Envoy ext_authz and any gRPC caller.
//!
//! The pipeline is the module tree: `request` (one normalised view of a call) → `identity` (the
//! verified token) → `policy` (compiled rules) → `decision` (the pure engine) → `challenge`
//! (`WWW-Authenticate`). `server` holds the two thin front doors; `config` loads the policy file.
//! See ARCHITECTURE.md for the map and its invariants.

pub mod api;
pub mod challenge;
pub mod config;
pub mod decision;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod policy;
pub mod replay;
pub mod request;
pub mod risk;
pub mod server;
pub(crate) mod stripe;
pub mod suite;
pub mod telemetry;
