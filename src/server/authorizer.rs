//! The shared state behind both front doors: the current policy snapshot, swapped whole on
//! reload, and the risk state (operators' blocks and revocations, the signals' counters)
//! applied over and fed by its decisions.

use std::{
    sync::{Arc, Weak},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::{ArcSwap, Guard};
use opentelemetry::trace::SpanContext;

use crate::{
    challenge,
    decision::{self, Decision, ExplainStep, Outcome, Reason, StepUp},
    identity::{
        ChallengeStyle, Principal,
        keys::{self, UnknownKid},
    },
    policy::Policy,
    request::{AccessRequest, Door, HeaderLimits},
    risk::{
        blocks::{Block, Blocks},
        revocations::{Revocation, Revocations},
        signals::{StoreFailure, StoreSpec},
        store::{Refusal, RiskState},
    },
    telemetry::{self, records::RecordSink, traces},
};

/// Decides requests against the current policy. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Authorizer {
    policy: ArcSwap<Policy>,
    /// `decision::decide`; tests put an engine that fails in its place.
    engine: Engine,
    /// Blocks and revocations (admin API, risk signals), applied over the engine's decisions,
    /// and the link that shares them (and the counters) with the other replicas.
    risk: Arc<RiskState>,
    /// The store was named by `--risk-store`, over the policy's `risk.store`.
    store_pinned: bool,
    /// Where decision records go, once opened; with `true`, whatever the policy's
    /// `records.enabled` (`--records`).
    records: std::sync::OnceLock<(Arc<RecordSink>, bool)>,
}

/// A worker's own handle on the shared [`Authorizer`]. A call clones its service, and the
/// service its handle, several times; cloning this handle writes a reference count that only its
/// worker's thread writes, where cloning the `Arc<Authorizer>` itself would write one line that
/// every core writes on every call. Each worker builds its services with a handle of its own.
#[derive(Debug, Clone)]
#[expect(
    clippy::redundant_allocation,
    reason = "the outer Arc is the worker's own reference count, the point of the handle"
)]
pub struct WorkerHandle(Arc<Arc<Authorizer>>);

impl WorkerHandle {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self(Arc::new(authorizer))
    }
}

impl std::ops::Deref for WorkerHandle {
    type Target = Authorizer;

    fn deref(&self) -> &Authorizer {
        &self.0
    }
}

/// `decision::decide_at`: (policy, request, now in seconds, now in milliseconds).
type Engine = fn(&Policy, &AccessRequest, i64, i64) -> Decision;

impl Authorizer {
    /// An authorizer whose risk state is in memory, shared with nobody.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            policy: ArcSwap::new(policy),
            engine: decision::decide_at,
            risk: RiskState::memory(),
            store_pinned: false,
            records: std::sync::OnceLock::new(),
        }
    }

    /// An authorizer with the risk store `store` names (`--risk-store`), or else its policy
    /// (`risk.store`): with Redis, linked in the background from now on (on the current Tokio
    /// runtime).
    pub fn start(policy: Arc<Policy>, store: Option<StoreSpec>) -> Arc<Self> {
        Arc::new_cyclic(|me: &Weak<Self>| {
            let me = me.clone();
            let store_pinned = store.is_some();
            let spec = store.unwrap_or_else(|| policy.risk.store.clone());
            let risk = RiskState::start(&spec, move || {
                me.upgrade().map(|authorizer| authorizer.policy())
            });
            Self {
                policy: ArcSwap::new(policy),
                engine: decision::decide_at,
                risk,
                store_pinned,
                records: std::sync::OnceLock::new(),
            }
        })
    }

    /// An authorizer deciding with `engine` (a test's stand-in for a bug in the engine).
    #[cfg(test)]
    pub(crate) fn with_engine(policy: Arc<Policy>, engine: Engine) -> Self {
        Self {
            policy: ArcSwap::new(policy),
            engine,
            risk: RiskState::memory(),
            store_pinned: false,
            records: std::sync::OnceLock::new(),
        }
    }

    /// Writes a record of every decision to `sink` from now on: when the policy enables records,
    /// or always with `forced` (`--records`).
    pub fn set_records(&self, sink: Arc<RecordSink>, forced: bool) {
        let _ = self.records.set((sink, forced));
    }

    /// Writes the decision records still pending and stops their writer (the end of `serve`).
    pub fn finish_records(&self) {
        if let Some((sink, _)) = self.records.get() {
            sink.finish();
        }
    }

    /// The blocks, revocations and shared store this authorizer applies.
    pub fn risk(&self) -> &Arc<RiskState> {
        &self.risk
    }

    /// The blocks this authorizer applies.
    pub fn blocks(&self) -> &Blocks {
        self.risk.blocks()
    }

    /// The revocations this authorizer applies.
    pub fn revocations(&self) -> &Revocations {
        self.risk.revocations()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Serves `policy` from now on. The risk signals it shares with the running policy (same
    /// name, same counting) keep their counters. The store is chosen at start: a reload naming
    /// another one is logged and takes effect at the next start.
    pub fn replace(&self, policy: Arc<Policy>) {
        let old = self.policy.load();
        policy.risk.inherit(&old.risk);
        let running = self.risk.spec();
        if policy.risk.store != running && !self.store_pinned {
            tracing::warn!(
                running = %running.redacted(),
                configured = %policy.risk.store.redacted(),
                "risk.store changed: the running store is kept until stepgate restarts"
            );
        }
        // The records file is opened at start, with its rotation: a reload turning records on,
        // or naming another file or rotation, takes effect at the next start.
        let (was, now) = (&old.records, &policy.records);
        match self.records.get() {
            None if now.enabled => tracing::warn!(
                "records.enabled: decision records start when stepgate restarts (their file is \
                 opened at start)"
            ),
            Some((_, forced))
                if (now.path != was.path && !forced)
                    || now.max_bytes != was.max_bytes
                    || now.keep != was.keep =>
            {
                tracing::warn!(
                    "records.path, max_bytes or keep changed: the running records file and its \
                     rotation are kept until stepgate restarts"
                );
            }
            _ => {}
        }
        drop(old);
        self.policy.store(policy);
        crate::identity::issuer::note_key_sets_changed();
    }

    /// The current policy's bounds on a request's headers.
    pub fn header_limits(&self) -> HeaderLimits {
        self.policy.load().header_limits
    }

    /// The policy now in force, for one call to read its request, its explain permission and its
    /// decision under ([`Self::decide_now_under`]): a reload landing in between must not have
    /// one call read by one policy and decided by another.
    pub fn snapshot(&self) -> Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// Decides and logs one request. A token refused only for an unknown `kid` gets one bounded
    /// wait for a shared key fetch and, if the key arrived, a second decision. Returns the policy
    /// snapshot it was decided under, so that the response is rendered with the same policy even
    /// if a reload lands meanwhile.
    pub async fn decide(
        &self,
        request: &AccessRequest,
        door: Door,
    ) -> (Decision, Guard<Arc<Policy>>) {
        self.decide_traced(request, door, None).await
    }

    /// [`Authorizer::decide`], in a trace span under `parent` (the caller's span) when traces
    /// are on.
    pub async fn decide_traced(
        &self,
        request: &AccessRequest,
        door: Door,
        parent: Option<SpanContext>,
    ) -> (Decision, Guard<Arc<Policy>>) {
        self.decide_traced_under(self.policy.load(), request, door, parent)
            .await
    }

    /// [`Self::decide_traced`] under `policy`, the snapshot the request was read under.
    pub async fn decide_traced_under(
        &self,
        policy: Guard<Arc<Policy>>,
        request: &AccessRequest,
        door: Door,
        parent: Option<SpanContext>,
    ) -> (Decision, Guard<Arc<Policy>>) {
        // The wait stays out of this future's state unless a decision needs it: the call's
        // future then holds a pointer, not the decision being made.
        let wait = match self.decide_now_under(policy, request, door, parent) {
            Ok(decided) => return decided,
            Err(wait) => wait,
        };
        Box::pin(self.decide_after_key(request, wait)).await
    }

    /// [`Authorizer::decide_traced`] without waiting: the decision, or, for a token refused only
    /// for an unknown `kid`, what [`Authorizer::decide_after_key`] needs to wait for the key and
    /// decide again. A `Check` is decided here in one go, with no future holding its state.
    pub fn decide_now(
        &self,
        request: &AccessRequest,
        door: Door,
        parent: Option<SpanContext>,
    ) -> Result<(Decision, Guard<Arc<Policy>>), Box<KeyWait>> {
        self.decide_now_under(self.policy.load(), request, door, parent)
    }

    /// [`Self::decide_now`] under `policy`, the snapshot the request was read under.
    pub fn decide_now_under(
        &self,
        policy: Guard<Arc<Policy>>,
        request: &AccessRequest,
        door: Door,
        parent: Option<SpanContext>,
    ) -> Result<(Decision, Guard<Arc<Policy>>), Box<KeyWait>> {
        let span = traces::start_decision(door, parent);
        let started = Instant::now();
        let now_ms = unix_now_ms();
        let now = now_ms.div_euclid(1000);
        let source_block = request
            .source
            .as_ref()
            .and_then(|peer| self.risk.blocks().matching_source(&peer.address, now));
        let decision =
            if policy.risk.on_store_failure == StoreFailure::FailClosed && self.risk.store_down() {
                let mut d = Decision::refusal(
                    503,
                    Reason::RiskStoreUnavailable,
                    "the shared risk store is unreachable and the policy fails closed",
                );
                d.www_authenticate = None;
                d
            } else if let Some(block) = source_block {
                // Before the token is read: a blocked source learns nothing about it.
                blocked(Reason::SourceBlocked, &block, request.explain)
            } else {
                let decision = (self.engine)(&policy, request, now, now_ms);
                if let Some((issuer_id, kid)) = decision.unknown_key.as_deref()
                    && let Some(issuer) = policy.issuers.by_id(issuer_id)
                {
                    return Err(Box::new(KeyWait {
                        issuer: Arc::clone(issuer),
                        kid: kid.clone(),
                        span,
                        started,
                        door,
                        policy,
                        decision,
                        now_ms,
                    }));
                }
                self.apply_refusal(decision, &policy, now)
            };
        Ok(self.finish(request, door, span, started, policy, decision, now_ms))
    }

    /// The rest of a decision [`Authorizer::decide_now`] left waiting: one bounded wait for a
    /// shared fetch of the unknown key and, if the key arrived, a second decision.
    pub async fn decide_after_key(
        &self,
        request: &AccessRequest,
        wait: Box<KeyWait>,
    ) -> (Decision, Guard<Arc<Policy>>) {
        let KeyWait {
            issuer,
            kid,
            span,
            started,
            door,
            policy,
            mut decision,
            now_ms,
        } = *wait;
        if keys::resolve_unknown_kid(&issuer, &kid).await == UnknownKid::Found {
            let now_ms = unix_now_ms();
            decision = (self.engine)(&policy, request, now_ms.div_euclid(1000), now_ms);
        }
        let decision = self.apply_refusal(decision, &policy, now_ms.div_euclid(1000));
        self.finish(request, door, span, started, policy, decision, now_ms)
    }

    /// What follows every decision: the risk state fed, the decision logged, recorded and its
    /// span ended.
    #[expect(
        clippy::too_many_arguments,
        reason = "the parts of one decision, named where they are used"
    )]
    fn finish(
        &self,
        request: &AccessRequest,
        door: Door,
        span: traces::DecisionSpan,
        started: Instant,
        policy: Guard<Arc<Policy>>,
        mut decision: Decision,
        now_ms: i64,
    ) -> (Decision, Guard<Arc<Policy>>) {
        let sink = self
            .records
            .get()
            .filter(|(_, forced)| *forced || policy.records.enabled)
            .map(|(sink, _)| sink);
        if sink.is_some() {
            // Before this request counts, as the decision read them.
            policy.risk.read_for_record(request, &mut decision, now_ms);
        }
        self.risk.record(&policy, request, &decision, now_ms);
        telemetry::log_decision(door, &decision, started.elapsed());
        if let Some(sink) = sink {
            sink.record(&policy.records, door, request, &decision);
        }
        span.end(door, &decision);
        (decision, policy)
    }
}

/// A decision waiting for an unknown key ([`Authorizer::decide_now`]).
pub struct KeyWait {
    issuer: Arc<crate::identity::issuer::Issuer>,
    kid: String,
    span: traces::DecisionSpan,
    started: Instant,
    door: Door,
    policy: Guard<Arc<Policy>>,
    /// The decision made without the key.
    decision: Decision,
    now_ms: i64,
}

impl Authorizer {
    /// A decision on a verified token the risk state refuses ([`RiskState::refusing`], the one
    /// place that says in which order) is overridden:
    /// - one whose subject, tenant, client or fingerprint an operator blocked becomes
    ///   `403 blocked`, whatever the policy said;
    /// - one issued before its subject's sessions were revoked becomes `401 session_revoked`.
    ///
    /// Only a verified token can be refused: a refused one is refused already.
    fn apply_refusal(&self, decision: Decision, policy: &Policy, now: i64) -> Decision {
        let Some(principal) = &decision.principal else {
            return decision;
        };
        let refused =
            match self
                .risk
                .refusing(principal, decision.token_fingerprint.as_deref(), now)
            {
                None => return decision,
                Some(Refusal::Blocked(block)) => {
                    blocked(Reason::Blocked, &block, !decision.explain.is_empty())
                }
                Some(Refusal::Revoked(revocation)) => revoked(
                    principal,
                    &revocation,
                    policy,
                    now,
                    !decision.explain.is_empty(),
                ),
            };
        overridden(decision, refused)
    }
}

/// `401 session_revoked` for a token issued before `revocation`: for an Entra issuer and a client
/// that handles claims challenges, the challenge Entra's continuous access evaluation sends (a
/// token whose `nbf` is at least the revocation time), so the client's library fetches a new token
/// at once; for an RFC 9470 issuer, a step-up whose `max_age` asks for a sign-in since the
/// revocation (a refresh, or a provider's single sign-on, would bring back the old `auth_time`);
/// for others an `invalid_token` challenge.
fn revoked(
    principal: &Principal,
    revocation: &Revocation,
    policy: &Policy,
    now: i64,
    explain: bool,
) -> Decision {
    let message = "this session was revoked: sign in again";
    // The challenge asks for a token issued after the revocation, which a refresh can give: it
    // is sent only while the token's `iat` is before it. A token issued since whose `auth_time`
    // is still before it came from a refresh of the revoked session, and asking again would
    // bring the same kind of token back: it is refused.
    let issuer = policy.issuers.by_id(&principal.issuer_id);
    let entra = issuer
        .filter(|issuer| issuer.challenge == ChallengeStyle::Entra)
        .filter(|_| principal.claims_challenge_capable)
        .filter(|_| {
            principal
                .issued_at
                .is_none_or(|iat| iat < revocation.before)
        });
    // A user's sign-in (a token with `auth_time`: a machine's client-credentials token has none,
    // and no user could meet the challenge), once the revocation time has come (before it, no
    // sign-in could be recent enough, and a max_age of 0 would ask for one again and again).
    let rfc9470 = issuer.is_some_and(|issuer| issuer.challenge == ChallengeStyle::Rfc9470)
        && !principal.app_only
        && principal.auth_time.is_some()
        && now > revocation.before;
    let mut revoked = match entra {
        None if rfc9470 => {
            // Signed in at or after the revocation: at most this many seconds ago.
            let max_age = u64::try_from(now - revocation.before).unwrap_or(1);
            let mut d = Decision::new(Outcome::StepUp, Reason::SessionRevoked, message, 401);
            d.www_authenticate = Some(challenge::insufficient_user_authentication(
                &policy.realm,
                message,
                &[],
                Some(max_age),
            ));
            d.step_up = Some(Box::new(StepUp {
                style: "rfc9470",
                max_age: Some(max_age),
                ..StepUp::default()
            }));
            d
        }
        Some(issuer) => {
            // The value is a string, as Entra sends it.
            let claims = serde_json::json!({
                "access_token": {"nbf": {"essential": true, "value": revocation.before.to_string()}}
            })
            .to_string();
            let encoded = challenge::encode_claims(&claims);
            let mut d = Decision::new(Outcome::StepUp, Reason::SessionRevoked, message, 401);
            d.www_authenticate = Some(challenge::entra_claims(&issuer.entra, &encoded));
            d.step_up = Some(Box::new(StepUp {
                style: "entra",
                claims: Some((claims, encoded)),
                ..StepUp::default()
            }));
            d
        }
        None => {
            let mut d = Decision::refusal(401, Reason::SessionRevoked, message);
            d.www_authenticate = Some(challenge::invalid_token(&policy.realm, message));
            d
        }
    };
    if explain {
        revoked.explain.push(ExplainStep {
            stage: "revocation",
            detail: format!(
                "sessions of {:?} issued before {} are revoked ({}); this token's: {}",
                principal.subject,
                revocation.before,
                revocation.reason_id,
                principal
                    .issued()
                    .map_or_else(|| "unknown".to_owned(), |t| t.to_string())
            ),
        });
    }
    revoked
}

impl Authorizer {
    /// Answers a call that failed while it was being decided (a panic, caught at its front door):
    /// a `500 internal_error` denial, logged and counted like any decision.
    pub fn failed(
        &self,
        door: Door,
        started: Instant,
        panic: &str,
    ) -> (Decision, Guard<Arc<Policy>>) {
        tracing::error!(
            door = door.as_str(),
            panic,
            "deciding a request panicked; it is refused (500 internal_error)"
        );
        self.refused(door, started, Decision::internal_error())
    }

    /// Logs, counts and records a denial made without the engine (see [`Decision::refusal`]):
    /// a call whose message does not decode or is too large, an overload, a caller not allowed,
    /// a panic. Its record holds no request (none was read), and counts against the records
    /// made without a verified token; replay keeps it as recorded.
    pub fn refused(
        &self,
        door: Door,
        started: Instant,
        decision: Decision,
    ) -> (Decision, Guard<Arc<Policy>>) {
        let policy = self.policy.load();
        telemetry::log_decision(door, &decision, started.elapsed());
        if let Some((sink, _)) = self
            .records
            .get()
            .filter(|(_, forced)| *forced || policy.records.enabled)
        {
            sink.record_refusal(&policy.records, door, &decision);
        }
        (decision, policy)
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `by` in place of the engine's `decision` (an operator's block or revocation), keeping what the
/// engine learned of the token (rule, principal, fingerprint, cache, what verification
/// established: the record of a blocked caller says who it was) and its explain steps first.
fn overridden(decision: Decision, mut by: Decision) -> Decision {
    by.explain.splice(0..0, decision.explain);
    Decision {
        rule: decision.rule,
        principal: decision.principal,
        token_fingerprint: decision.token_fingerprint,
        token_cached: decision.token_cached,
        verified: decision.verified,
        ..by
    }
}

/// `403 blocked` or `403 source_blocked` for `block`: its reason id travels (dynamic metadata,
/// `Decide`'s `block`), its free text does not.
fn blocked(reason: Reason, block: &Block, explain: bool) -> Decision {
    let what = match reason {
        Reason::SourceBlocked => "requests from this address are blocked",
        _ => "access is blocked",
    };
    let mut decision = Decision::refusal(403, reason, what);
    decision.block = Some(Arc::clone(&block.reason_id));
    if explain {
        decision.explain.push(ExplainStep {
            stage: "block",
            detail: format!(
                "{} {:?} is blocked by an operator until {} ({})",
                block.kind.as_str(),
                block.value,
                block.expires_at,
                block.reason_id
            ),
        });
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::testing::{DEMO_POLICY, compile_policy},
        request::{Headers, HttpAttributes},
    };

    /// A call read under one policy is decided under it, whatever reload lands in between.
    #[test]
    fn a_call_is_decided_under_the_snapshot_it_was_read_under() {
        let authorizer = Authorizer::new(Arc::new(compile_policy(DEMO_POLICY)));
        let health = AccessRequest {
            http: Some(HttpAttributes::new(
                "GET",
                "h",
                "/healthz",
                Headers::default(),
            )),
            ..Default::default()
        };
        let read_under = authorizer.snapshot();
        let moved = DEMO_POLICY.replace("path: /healthz }", "path: /healthz-moved }");
        assert_ne!(moved, DEMO_POLICY, "the demo's health rule moved");
        authorizer.replace(Arc::new(compile_policy(&moved)));
        let decided = |result: Result<(Decision, Guard<Arc<Policy>>), Box<KeyWait>>| {
            result.ok().expect("decided without a key wait").0
        };
        let old = decided(authorizer.decide_now_under(read_under, &health, Door::Check, None));
        assert!(old.is_allow(), "{old:?}");
        let new = decided(authorizer.decide_now(&health, Door::Check, None));
        assert!(!new.is_allow(), "{new:?}");
    }
}
