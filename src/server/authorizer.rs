//! The shared state behind both front doors: the current policy snapshot, swapped whole on reload.

use std::{
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::{ArcSwap, Guard};
use opentelemetry::trace::SpanContext;

use crate::{
    decision::{self, Decision, ExplainStep, Reason},
    identity::keys::{self, UnknownKid},
    policy::Policy,
    request::{AccessRequest, Door, HeaderLimits},
    risk::blocks::{Block, Blocks, Subject},
    telemetry::{self, traces},
};

/// Decides requests against the current policy. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Authorizer {
    policy: ArcSwap<Policy>,
    /// `decision::decide`; tests put an engine that fails in its place.
    engine: Engine,
    /// Operators' blocks (admin API), applied over the engine's decisions.
    blocks: Arc<Blocks>,
}

type Engine = fn(&Policy, &AccessRequest, i64) -> Decision;

impl Authorizer {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            policy: ArcSwap::new(policy),
            engine: decision::decide,
            blocks: Arc::default(),
        }
    }

    /// An authorizer deciding with `engine` (a test's stand-in for a bug in the engine).
    #[cfg(test)]
    pub(crate) fn with_engine(policy: Arc<Policy>, engine: Engine) -> Self {
        Self {
            policy: ArcSwap::new(policy),
            engine,
            blocks: Arc::default(),
        }
    }

    /// The operators' blocks this authorizer applies.
    pub fn blocks(&self) -> &Arc<Blocks> {
        &self.blocks
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub fn replace(&self, policy: Arc<Policy>) {
        self.policy.store(policy);
    }

    /// The current policy's bounds on a request's headers.
    pub fn header_limits(&self) -> HeaderLimits {
        self.policy.load().header_limits
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
        let span = traces::start_decision(door, parent);
        let started = Instant::now();
        let policy = self.policy.load();
        let now = unix_now();
        let source_block = request
            .source
            .as_ref()
            .and_then(|peer| self.blocks.matching_source(&peer.address, now));
        let decision = match source_block {
            // Before the token is read: a blocked source learns nothing about it.
            Some(block) => blocked(Reason::SourceBlocked, &block, request.explain),
            None => {
                let mut decision = (self.engine)(&policy, request, now);
                if let Some((issuer_id, kid)) = &decision.unknown_key
                    && let Some(issuer) = policy.issuers.by_id(issuer_id)
                    && keys::resolve_unknown_kid(issuer, kid).await == UnknownKid::Found
                {
                    decision = (self.engine)(&policy, request, unix_now());
                }
                self.apply_blocks(decision, now)
            }
        };
        telemetry::log_decision(door, &decision, started.elapsed());
        span.end(door, &decision);
        (decision, policy)
    }
}

impl Authorizer {
    /// A decision on a verified token whose subject, tenant, client or fingerprint an operator
    /// blocked becomes `403 blocked`, whatever the policy said. Only a verified token can be
    /// blocked: a refused one is refused already.
    fn apply_blocks(&self, decision: Decision, now: i64) -> Decision {
        let Some(principal) = &decision.principal else {
            return decision;
        };
        let who = Subject {
            subject: Some(&principal.subject),
            tenant: principal.tenant.as_deref(),
            client_id: principal.client_id.as_deref(),
            token: decision.token_fingerprint.as_deref(),
        };
        let Some(block) = self.blocks.matching(who, now) else {
            return decision;
        };
        let mut denied = blocked(Reason::Blocked, &block, !decision.explain.is_empty());
        denied.explain.splice(0..0, decision.explain);
        Decision {
            rule: decision.rule,
            principal: decision.principal,
            token_fingerprint: decision.token_fingerprint,
            token_cached: decision.token_cached,
            ..denied
        }
    }

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

    /// Logs and counts a denial made without the engine (see [`Decision::refusal`]).
    pub fn refused(
        &self,
        door: Door,
        started: Instant,
        decision: Decision,
    ) -> (Decision, Guard<Arc<Policy>>) {
        telemetry::log_decision(door, &decision, started.elapsed());
        (decision, self.policy.load())
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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
