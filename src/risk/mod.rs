//! Risk state beside the engine: what operators add while stepgate runs, through the admin API
//! (blocks in [`blocks`], revoked sessions in [`revocations`]), and what stepgate counts itself
//! (risk signals in [`signals`], over the sliding-window [`counters`]). Each replica holds it in
//! memory; with a Redis store ([`store`]) the replicas share it.

pub mod blocks;
pub mod counters;
pub mod redis;
pub mod revocations;
pub mod signals;
pub mod store;
