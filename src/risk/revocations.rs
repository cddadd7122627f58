//! Revoked sessions: "every token of this subject issued before T is no longer good", set by an
//! operator through the admin API after an account takeover or a password reset. A token is
//! issued when its `iat` says, or failing that its `auth_time`; one with neither cannot show it
//! came after T, and is revoked too.
//!
//! A revocation is kept for [`KEEP_SECONDS`] after T, past the life of any token issued before it
//! (Entra's continuous-access tokens live up to 28 hours). Bounded like the blocks.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use super::blocks::MAX_BLOCKED_VALUE_BYTES;
use crate::telemetry::metrics;

/// Most subjects revoked at once.
pub const MAX_REVOCATIONS: usize = 100_000;
/// How long a revocation is kept after its time: 48 hours.
pub const KEEP_SECONDS: i64 = 48 * 3600;
/// How far ahead of this server's clock a revocation time may be (another host's clock): the
/// admin API refuses more, and a revocation or block read from the shared store that no replica
/// could have written under it is ignored.
pub const MAX_CLOCK_AHEAD_SECONDS: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub subject: String,
    /// Tokens issued before this (Unix seconds) are revoked.
    pub before: i64,
    pub reason_id: Arc<str>,
    pub reason: String,
    pub created_at: i64,
    pub created_by: String,
}

#[derive(Debug, Default)]
pub struct Revocations {
    table: RwLock<HashMap<String, Arc<Revocation>>>,
    count: AtomicUsize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevokeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{MAX_REVOCATIONS} revocations are kept already")]
    Full,
}

impl Revocations {
    /// Revokes a subject's tokens issued before `revocation.before`. A later revocation of the
    /// same subject replaces an earlier one (it covers it); an earlier one does not shorten it.
    pub fn set(&self, revocation: Revocation, now: i64) -> Result<Arc<Revocation>, RevokeError> {
        if revocation.subject.is_empty() || revocation.subject.len() > MAX_BLOCKED_VALUE_BYTES {
            return Err(RevokeError::Invalid(format!(
                "a subject must be 1 to {MAX_BLOCKED_VALUE_BYTES} bytes"
            )));
        }
        if revocation.before.saturating_add(KEEP_SECONDS) <= now {
            return Err(RevokeError::Invalid(
                "that time is so far back that no token issued before it can still be valid".into(),
            ));
        }
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = table.get(&revocation.subject)
            && existing.before >= revocation.before
        {
            return Ok(Arc::clone(existing));
        }
        if !table.contains_key(&revocation.subject) && table.len() >= MAX_REVOCATIONS {
            table.retain(|_, r| r.before.saturating_add(KEEP_SECONDS) > now);
            if table.len() >= MAX_REVOCATIONS {
                return Err(RevokeError::Full);
            }
        }
        let revocation = Arc::new(revocation);
        table.insert(revocation.subject.clone(), Arc::clone(&revocation));
        self.count.store(table.len(), Relaxed);
        metrics::global().set_revocations_held(table.len());
        Ok(revocation)
    }

    /// The revocation a token of `subject` issued at `issued` (`iat`, else `auth_time`) falls
    /// under, if any.
    pub fn revoking(
        &self,
        subject: &str,
        issued: Option<i64>,
        now: i64,
    ) -> Option<Arc<Revocation>> {
        if self.count.load(Relaxed) == 0 {
            return None;
        }
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let revocation = table.get(subject)?;
        let in_force = revocation.before.saturating_add(KEEP_SECONDS) > now;
        (in_force && issued.is_none_or(|at| at < revocation.before)).then(|| Arc::clone(revocation))
    }

    /// The revocations kept, by subject.
    pub fn list(&self, now: i64) -> Vec<Arc<Revocation>> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let mut list: Vec<_> = table
            .values()
            .filter(|r| r.before.saturating_add(KEEP_SECONDS) > now)
            .cloned()
            .collect();
        list.sort_by(|a, b| a.subject.cmp(&b.subject));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn revoke(subject: &str, before: i64) -> Revocation {
        Revocation {
            subject: subject.to_owned(),
            before,
            reason_id: Arc::from("INC-1"),
            reason: String::new(),
            created_at: NOW,
            created_by: "san:ops".to_owned(),
        }
    }

    #[test]
    fn tokens_issued_before_the_time_are_revoked_and_later_ones_are_not() {
        let revocations = Revocations::default();
        assert!(revocations.revoking("alice", Some(NOW - 10), NOW).is_none());
        revocations.set(revoke("alice", NOW), NOW).unwrap();
        assert!(revocations.revoking("alice", Some(NOW - 10), NOW).is_some());
        assert!(
            revocations.revoking("alice", None, NOW).is_some(),
            "no issue time: revoked"
        );
        assert!(revocations.revoking("alice", Some(NOW), NOW).is_none());
        assert!(revocations.revoking("bob", Some(NOW - 10), NOW).is_none());
        // An earlier revocation does not shorten a later one.
        revocations.set(revoke("alice", NOW - 100), NOW).unwrap();
        assert!(revocations.revoking("alice", Some(NOW - 10), NOW).is_some());
        // Kept 48 hours after its time, then forgotten.
        assert!(
            revocations
                .revoking("alice", Some(NOW - 10), NOW + KEEP_SECONDS)
                .is_none()
        );
        assert!(
            revocations
                .set(revoke("carol", NOW - KEEP_SECONDS), NOW)
                .is_err()
        );
        assert_eq!(revocations.list(NOW).len(), 1);
    }
}
