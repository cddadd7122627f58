//! What operators and risk signals add to the policy while stepgate runs. Today: blocks set
//! through the admin API ([`blocks`]), held in memory by each replica.

pub mod blocks;
