//! The risk state a server holds: blocks, revocations, and — with a Redis store — the link that
//! shares them and the signals' counters with the other replicas. The request path only ever
//! reads the local view; writes go to it first and reach Redis in the background.

use std::sync::Arc;

use super::{
    blocks::{Block, BlockError, Blocks, Kind, Subject},
    redis::Shared,
    revocations::{Revocation, Revocations, RevokeError},
    signals::{Action, Crossing, KeyKind, RiskPolicy, Signal, StoreSpec},
};
use crate::telemetry::throttle::{Throttle, WARNING_PERIOD};
use crate::{
    decision::Decision, identity::Principal, policy::Policy, request::AccessRequest,
    telemetry::metrics,
};

/// Blocks, revocations and the shared store behind them.
#[derive(Debug, Default)]
pub struct RiskState {
    blocks: Blocks,
    revocations: Revocations,
    /// `None`: this replica's memory only.
    shared: Option<Shared>,
    /// The store in use, chosen at start.
    spec: Option<StoreSpec>,
}

/// What refuses a verified token whatever the policy says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An operator's (or a risk signal's) block on its subject, tenant, client, fingerprint or
    /// token id.
    Blocked(Arc<Block>),
    /// Its subject's sessions were revoked after it was issued.
    Revoked(Arc<Revocation>),
}

impl RiskState {
    /// State in memory, shared with nobody.
    pub fn memory() -> Arc<Self> {
        Arc::default()
    }

    /// State for `spec`: with Redis, the link is started in the background (on the current
    /// Tokio runtime) and the state serves from memory until it is up.
    pub fn start(
        spec: &StoreSpec,
        policy: impl Fn() -> Option<Arc<Policy>> + Send + Sync + 'static,
    ) -> Arc<Self> {
        match spec {
            StoreSpec::Memory => Self::memory(),
            StoreSpec::Redis(url) => {
                let (shared, link) = Shared::new(url, Arc::new(policy));
                let state = Arc::new(Self {
                    blocks: Blocks::default(),
                    revocations: Revocations::default(),
                    shared: Some(shared),
                    spec: Some(spec.clone()),
                });
                link.spawn(Arc::downgrade(&state));
                state
            }
        }
    }

    /// The store in use.
    pub fn spec(&self) -> StoreSpec {
        self.spec.clone().unwrap_or(StoreSpec::Memory)
    }

    pub fn blocks(&self) -> &Blocks {
        &self.blocks
    }

    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// The block, else the revocation, that refuses a verified token of `principal` whose
    /// fingerprint is `fingerprint`, if any: what the `Authorizer` applies over a decision and
    /// the admin API to its bearer-token callers, in one order (a block first). A token is issued
    /// when its `iat` says, else its `auth_time`.
    pub fn refusing(
        &self,
        principal: &Principal,
        fingerprint: Option<&str>,
        now: i64,
    ) -> Option<Refusal> {
        if let Some(block) = self
            .blocks
            .matching(Subject::of_token(principal, fingerprint), now)
        {
            return Some(Refusal::Blocked(block));
        }
        self.revocations
            .revoking(&principal.subject, principal.issued(), now)
            .map(Refusal::Revoked)
    }

    /// Whether this replica knows the shared blocks and revocations: always in memory; with
    /// Redis, once it has read them (a replica started while Redis is unreachable knows none).
    pub fn synced(&self) -> bool {
        self.shared.as_ref().is_none_or(Shared::is_synced)
    }

    /// Whether a shared store is configured and currently unreachable.
    pub fn store_down(&self) -> bool {
        self.shared.as_ref().is_some_and(Shared::is_down)
    }

    /// Sets a block here and in the shared store.
    pub fn set_block(&self, block: Block, now: i64) -> Result<Arc<Block>, BlockError> {
        let _order = self.shared.as_ref().map(Shared::in_order);
        let wanted = (block.created_by.clone(), block.expires_at);
        let (block, evicted) = self.blocks.set_evicting(block, now, true)?;
        if let Some(shared) = &self.shared {
            // A longer block kept in force (a signal's never shortens one) is not written again:
            // this replica may hold one the others lifted.
            if (block.created_by.as_str(), block.expires_at) == (wanted.0.as_str(), wanted.1) {
                shared.block_set(&block);
            }
            Self::drop_evicted(shared, evicted);
        }
        Ok(block)
    }

    /// Applies a block the shared store holds (a resync, another replica's change): here only,
    /// but a risk signal's source block it evicts is dropped from the store too, so that the
    /// store holds no more of them than a replica keeps, and a resync does not re-apply (and
    /// evict) them again and again. The store's block is applied as it is, even one shorter
    /// than the block in force here: the store's record is the cluster's word.
    pub(super) fn apply_stored_block(&self, block: Block, now: i64) -> Result<(), BlockError> {
        let (_, evicted) = self.blocks.set_evicting(block, now, false)?;
        if let Some(shared) = &self.shared {
            Self::drop_evicted(shared, evicted);
        }
        Ok(())
    }

    fn drop_evicted(shared: &Shared, evicted: Option<Arc<Block>>) {
        if let Some(evicted) = evicted {
            shared.block_evicted(&evicted);
        }
    }

    /// Lifts a block here and in the shared store.
    pub fn remove_block(&self, kind: Kind, value: &str, now: i64) -> Result<bool, BlockError> {
        let normalized = super::blocks::normalize(kind, value)?;
        let _order = self.shared.as_ref().map(Shared::in_order);
        let lifted = self.blocks.get(kind, &normalized, now);
        let removed = self.blocks.remove(kind, &normalized, now)?;
        if let Some(shared) = &self.shared {
            // The lift is kept as long as the block would have lasted (a day when this replica
            // did not know it), so that a replica cut off meanwhile cannot bring it back.
            let until = lifted.map_or(now + 24 * 3600, |b| b.expires_at);
            shared.block_removed(kind, &normalized, until);
        }
        Ok(removed)
    }

    /// Revokes a subject's sessions here and in the shared store.
    pub fn revoke(&self, revocation: Revocation, now: i64) -> Result<Arc<Revocation>, RevokeError> {
        let revocation = self.revocations.set(revocation, now)?;
        if let Some(shared) = &self.shared {
            shared.revoked(&revocation);
        }
        Ok(revocation)
    }

    /// Counts a decided request in the policy's risk signals, and acts on each threshold it
    /// reaches.
    pub fn record(
        &self,
        policy: &Arc<Policy>,
        request: &AccessRequest,
        decision: &Decision,
        now_ms: i64,
    ) {
        let crossings = policy
            .risk
            .record(request, decision, now_ms, |signal, key, distinct| {
                if let Some(shared) = &self.shared {
                    shared.counted(policy, signal, key, distinct, now_ms);
                }
            });
        for crossing in crossings {
            self.crossed(&policy.risk, &crossing, now_ms);
        }
    }

    /// A signal's count for a key reached its threshold (here, or in the shared store): the
    /// action applies. `step_up` needs nothing more (the engine reads the count); `block` sets a
    /// block; every action is logged and counted.
    pub fn crossed(&self, risk: &RiskPolicy, crossing: &Crossing, now_ms: i64) {
        let Some(signal) = risk.signals.get(crossing.signal) else {
            return;
        };
        if !crossing.fresh {
            // A `block` signal's key counted again over its threshold: blocked again unless a
            // block is in force on it already.
            let Action::Block { seconds } = signal.action else {
                return;
            };
            let kind = block_kind(signal.key);
            let now = now_ms.div_euclid(1000);
            // Not while the counts of before an operator's lift last (two windows): a lift holds
            // until the key crosses its threshold again.
            let held_off = |value: &str| {
                self.blocks.get(kind, value, now).is_some()
                    || self.blocks.lifted_at(kind, value).is_some_and(|at| {
                        now - at < 2 * i64::try_from(signal.window_seconds).unwrap_or(i64::MAX)
                    })
            };
            let blocked = super::blocks::normalize(kind, &crossing.key).is_ok_and(|v| held_off(&v));
            if !blocked {
                metrics::global().count_risk_trigger(&signal.name, signal.action.as_str());
                self.block_for_signal(signal, &crossing.key, seconds, now_ms, false);
            }
            return;
        }
        metrics::global().count_risk_trigger(&signal.name, signal.action.as_str());
        // The key comes from a token (a subject may hold any character): a `&str` field, which
        // the text log escapes (and JSON quotes), never `%`, which the text log writes raw.
        tracing::warn!(
            target: "stepgate::risk",
            signal = &*signal.name,
            action = signal.action.as_str(),
            key_kind = signal.key.as_str(),
            key = crossing.key.as_str(),
            count = crossing.count,
            threshold = signal.threshold,
            "risk signal reached its threshold"
        );
        if let Action::Block { seconds } = signal.action {
            self.block_for_signal(signal, &crossing.key, seconds, now_ms, true);
        }
    }

    /// Blocks `key` for a signal. A failure is logged for a fresh crossing only: a key counted
    /// again over its threshold is retried at each event, and must not log at each.
    fn block_for_signal(&self, signal: &Signal, key: &str, seconds: i64, now_ms: i64, fresh: bool) {
        let kind = block_kind(signal.key);
        let now = now_ms.div_euclid(1000);
        let block = Block {
            kind,
            value: key.to_owned(),
            reason_id: Arc::from(format!("risk.{}", signal.name)),
            reason: format!(
                "risk signal {} reached {} ({} over {}s)",
                signal.name,
                signal.threshold,
                signal.event.as_str(),
                signal.window_seconds
            ),
            created_at: now,
            expires_at: now + seconds,
            created_by: format!("{}{}", super::blocks::RISK_CREATOR_PREFIX, signal.name),
        };
        match self.set_block(block, now) {
            // A longer block was in force already, and stays.
            Ok(block)
                if !block
                    .created_by
                    .starts_with(super::blocks::RISK_CREATOR_PREFIX) => {}
            Ok(block) => tracing::warn!(
                target: "stepgate::audit",
                action = "block",
                by = block.created_by.as_str(),
                kind = block.kind.as_str(),
                value = block.value.as_str(),
                reason_id = &*block.reason_id,
                expires_at = block.expires_at,
                "blocked by a risk signal"
            ),
            Err(_) if !fresh => {}
            Err(err) => {
                // Once the table is full, every later crossing fails alike: said every 10 s.
                static ERRORS: Throttle = Throttle::new(WARNING_PERIOD);
                if let Some(unlogged) = ERRORS.admit() {
                    tracing::error!(
                        target: "stepgate::risk",
                        signal = &*signal.name,
                        error = %err,
                        unlogged,
                        "a risk signal's block could not be set (later failures within 10 s are \
                         only counted)"
                    );
                }
            }
        }
    }
}

/// The kind of block a signal keyed so sets.
fn block_kind(key: KeyKind) -> Kind {
    match key {
        KeyKind::Subject => Kind::Subject,
        KeyKind::Source => Kind::Source,
        KeyKind::ClientId => Kind::ClientId,
        KeyKind::Tenant => Kind::Tenant,
        KeyKind::Token => Kind::Token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn principal(subject: &str, issued_at: Option<i64>) -> Principal {
        Principal {
            subject: Arc::from(subject),
            tenant: Some(Arc::from("contoso")),
            client_id: Some(Arc::from("portal")),
            token_id: Some(Arc::from("jti-1")),
            issued_at,
            auth_time: Some(NOW - 3600),
            ..Principal::default()
        }
    }

    fn block(kind: Kind, value: &str) -> Block {
        Block {
            kind,
            value: value.to_owned(),
            reason_id: Arc::from("INC-1"),
            reason: String::new(),
            created_at: NOW,
            expires_at: NOW + 60,
            created_by: "san:ops".to_owned(),
        }
    }

    fn revocation(subject: &str, before: i64) -> Revocation {
        Revocation {
            subject: subject.to_owned(),
            before,
            reason_id: Arc::from("INC-2"),
            reason: String::new(),
            created_at: NOW,
            created_by: "san:ops".to_owned(),
        }
    }

    #[test]
    fn a_token_is_refused_by_a_block_on_any_of_its_fields_or_its_subjects_revocation() {
        let fingerprint = Some("0123456789ab");
        let alice = principal("alice", Some(NOW - 10));
        for (kind, value) in [
            (Kind::Subject, "alice"),
            (Kind::Tenant, "contoso"),
            (Kind::ClientId, "portal"),
            (Kind::Token, "0123456789ab"),
            (Kind::TokenId, "jti-1"),
        ] {
            let state = RiskState::default();
            assert_eq!(state.refusing(&alice, fingerprint, NOW), None);
            state.set_block(block(kind, value), NOW).unwrap();
            assert!(
                matches!(state.refusing(&alice, fingerprint, NOW), Some(Refusal::Blocked(b)) if b.kind == kind),
                "{kind:?}"
            );
            assert_eq!(
                state.refusing(&alice, fingerprint, NOW + 60),
                None,
                "expired"
            );
        }
        // A source block is about the address a request comes from, not the token.
        let state = RiskState::default();
        state
            .set_block(block(Kind::Source, "127.0.0.0/8"), NOW)
            .unwrap();
        assert_eq!(state.refusing(&alice, fingerprint, NOW), None);

        // Revoked: issued (the earlier of iat and auth_time) before the time; a block is named
        // first.
        let state = RiskState::default();
        state.revoke(revocation("alice", NOW), NOW).unwrap();
        assert!(matches!(
            state.refusing(&alice, fingerprint, NOW),
            Some(Refusal::Revoked(_))
        ));
        let signed_in_again = Principal {
            auth_time: Some(NOW),
            ..principal("alice", Some(NOW))
        };
        assert_eq!(state.refusing(&signed_in_again, fingerprint, NOW), None);
        assert!(
            matches!(
                state.refusing(&principal("alice", Some(NOW)), fingerprint, NOW),
                Some(Refusal::Revoked(_))
            ),
            "refreshed: a new iat, the sign-in of an hour ago"
        );
        assert!(
            matches!(
                state.refusing(&principal("alice", None), fingerprint, NOW),
                Some(Refusal::Revoked(_))
            ),
            "no iat: its auth_time, an hour ago"
        );
        assert_eq!(
            state.refusing(&principal("bob", Some(NOW - 10)), fingerprint, NOW),
            None
        );
        state.set_block(block(Kind::Subject, "alice"), NOW).unwrap();
        assert!(matches!(
            state.refusing(&alice, fingerprint, NOW),
            Some(Refusal::Blocked(_))
        ));
    }

    /// A policy whose `denials` signal blocks a subject after 3 denials in 10 minutes.
    fn blocking_policy(block_for: &str) -> Arc<Policy> {
        use crate::policy::testing::{DEMO_POLICY, compile_policy};
        let text = DEMO_POLICY.replace(
            "risk:\n  signals:\n",
            &format!(
                "risk:\n  signals:\n    denials:\n      count: deny\n      key: subject\n      \
                 window: 10m\n      threshold: 3\n      action: block\n      block_for: {block_for}\n"
            ),
        );
        assert_ne!(text, DEMO_POLICY);
        Arc::new(compile_policy(&text))
    }

    fn denial_of(subject: &str) -> Decision {
        let mut denied = Decision::new(
            crate::decision::Outcome::Deny,
            crate::decision::Reason::MissingRole,
            "",
            403,
        );
        denied.principal = Some(Arc::new(principal(subject, Some(NOW))));
        denied
    }

    /// A `block` signal blocks a key each time it is counted at or over its threshold with no
    /// block in force: after a short block ends, and when a reload turned the signal from `log`
    /// to `block` with the key over its threshold already. It acted only on the event that
    /// crossed the threshold, so a caller who kept the count high was never blocked again. An
    /// operator's lift holds until the key crosses its threshold again.
    #[test]
    fn a_block_signal_blocks_again_a_key_still_over_its_threshold() {
        let state = RiskState::default();
        let policy = blocking_policy("5s");
        let request = AccessRequest::default();
        let blocked = |at: i64| state.blocks().get(Kind::Subject, "mallory", at).is_some();
        for i in 0..3 {
            state.record(&policy, &request, &denial_of("mallory"), (NOW + i) * 1000);
        }
        assert!(blocked(NOW + 3), "blocked at the threshold");
        assert!(!blocked(NOW + 8), "the 5 s block is over");
        // Counted again, over the threshold: blocked again.
        state.record(&policy, &request, &denial_of("mallory"), (NOW + 9) * 1000);
        assert!(blocked(NOW + 10), "blocked again");
        let again = state
            .blocks()
            .get(Kind::Subject, "mallory", NOW + 10)
            .unwrap();
        assert_eq!(again.expires_at, NOW + 14);
        // Lifted by an operator: the lift holds while the counts of before it last...
        state
            .remove_block(Kind::Subject, "mallory", NOW + 10)
            .unwrap();
        state.record(&policy, &request, &denial_of("mallory"), (NOW + 11) * 1000);
        assert!(!blocked(NOW + 11), "the operator's lift holds");
        // ... and a new crossing, once they are gone, blocks again.
        let later = NOW + 1300;
        for i in 0..3 {
            state.record(&policy, &request, &denial_of("mallory"), (later + i) * 1000);
        }
        assert!(blocked(later + 3), "crossed again");
    }

    /// A block the shared store holds is applied as it is, a shorter one too: the store's record
    /// is the cluster's word (an operator's lift a replica missed, then a signal's block
    /// written over it, must not bring the lifted block back on that replica).
    #[test]
    fn a_stored_block_is_applied_as_the_store_holds_it() {
        let state = RiskState::default();
        let operators = Block {
            expires_at: NOW + 3600,
            ..block(Kind::Subject, "mallory")
        };
        state.set_block(operators, NOW).unwrap();
        let signals = Block {
            expires_at: NOW + 20,
            created_by: format!("{}denials", super::super::blocks::RISK_CREATOR_PREFIX),
            ..block(Kind::Subject, "mallory")
        };
        state.apply_stored_block(signals, NOW).unwrap();
        let applied = state.blocks().get(Kind::Subject, "mallory", NOW).unwrap();
        assert_eq!(applied.expires_at, NOW + 20, "{applied:?}");
    }

    /// A risk signal's block never shortens a block in force: an operator's hour stays an hour
    /// when the signal blocks the same subject for minutes.
    #[test]
    fn a_signals_block_never_shortens_one_in_force() {
        // An operator's block of `ttl` seconds, then a signal blocking the same subject for
        // `block_for`: the block in force half a minute later.
        let after = |ttl: i64, block_for: &str| {
            let state = RiskState::default();
            let operators = Block {
                expires_at: NOW + ttl,
                ..block(Kind::Subject, "mallory")
            };
            state.set_block(operators, NOW).unwrap();
            let policy = blocking_policy(block_for);
            for i in 0..3 {
                let at = (NOW + i) * 1000;
                state.record(
                    &policy,
                    &AccessRequest::default(),
                    &denial_of("mallory"),
                    at,
                );
            }
            state
                .blocks()
                .get(Kind::Subject, "mallory", NOW + 30)
                .unwrap()
        };
        let kept = after(3600, "20s");
        assert_eq!(kept.expires_at, NOW + 3600, "{kept:?}");
        let by_risk = |b: &Block| {
            b.created_by
                .starts_with(super::super::blocks::RISK_CREATOR_PREFIX)
        };
        assert!(!by_risk(&kept), "{kept:?}");
        // A longer one replaces a shorter one.
        let longer = after(10, "1h");
        assert!(
            longer.expires_at > NOW + 3000 && by_risk(&longer),
            "{longer:?}"
        );
    }

    /// A token without a subject (no `sub`, or `sub: ""`) is counted under no subject key: such
    /// tokens of every issuer and client would otherwise share one count.
    #[test]
    fn an_empty_subject_is_no_key() {
        let state = RiskState::default();
        let policy = blocking_policy("1h");
        for i in 0..5 {
            state.record(
                &policy,
                &AccessRequest::default(),
                &denial_of(""),
                (NOW + i) * 1000,
            );
        }
        assert_eq!(policy.risk.signals[0].count("", (NOW + 5) * 1000), 0);
    }
}
