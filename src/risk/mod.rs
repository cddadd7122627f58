//! What operators add to the policy while stepgate runs, through the admin API: blocks
//! ([`blocks`]) and revoked sessions ([`revocations`]), held in memory by each replica.

pub mod blocks;
pub mod revocations;
