//! Decisions: the outcome, its reason, and everything a front door needs to render it.
//!
//! [`decide`] is the whole engine: credential → token → rule → requirement → outcome. It is pure:
//! no I/O, no clock (`now` is an argument), no wire types. Both front doors call it and only it.

mod evaluate;
mod reason;
#[cfg(test)]
mod tests;

use std::{borrow::Cow, sync::Arc};

pub use evaluate::{decide, decide_at, decide_token};
pub use reason::Reason;

use crate::identity::{Principal, VerifiedToken};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allow,
    StepUp,
    Deny,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::StepUp => "STEP_UP",
            Self::Deny => "DENY",
        }
    }
}

/// The structured form of a step-up challenge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepUp {
    pub style: &'static str,
    pub auth_contexts: Vec<String>,
    pub missing_auth_contexts: Vec<String>,
    pub acr_values: Vec<String>,
    pub max_age: Option<u64>,
    pub amr: Vec<String>,
    /// Entra claims request (minified JSON) and its base64 form.
    pub claims: Option<(String, String)>,
}

/// What a rule or escalation in shadow mode would have answered (it did not enforce).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shadow {
    pub rule: Arc<str>,
    /// The escalation's index in its rule; `None` for the rule itself.
    pub escalation: Option<usize>,
    pub outcome: Outcome,
    pub reason: Reason,
}

impl Shadow {
    /// `rule` or `rule/escalate[i]`: how logs, metrics and metadata name it.
    pub fn name(&self) -> String {
        match self.escalation {
            None => self.rule.to_string(),
            Some(i) => format!("{}/escalate[{i}]", self.rule),
        }
    }
}

/// One step of an evaluation, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainStep {
    pub stage: &'static str,
    pub detail: String,
}

/// The answer to one request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub outcome: Outcome,
    pub reason: Reason,
    pub message: Cow<'static, str>,
    pub rule: Option<Arc<str>>,
    pub http_status: u16,
    pub www_authenticate: Option<String>,
    /// Boxed: a STEP_UP is the rarer answer, and every decision is moved several times.
    pub step_up: Option<Box<StepUp>>,
    pub principal: Option<Arc<Principal>>,
    /// Headers for the upstream (ALLOW only). Names and most values are shared with the policy
    /// and the cached token, so an ALLOW copies no string to carry them.
    pub identity_headers: Vec<(Arc<str>, Arc<str>)>,
    /// The request's headers spelled like stepgate's own (`x-stepgate-*`, `x_stepgate_*`, any
    /// case) that the policy does not name and the decision does not set: an allowed request
    /// loses them with the unset identity headers, so that no client's reaches the upstream as
    /// stepgate's, whichever of them the upstream reads.
    pub stray_headers: Vec<String>,
    pub token_fingerprint: Option<String>,
    /// DENY `blocked`/`source_blocked`: the block's reason id.
    pub block: Option<Arc<str>>,
    /// What shadow-mode rules and escalations would have answered.
    pub shadow: Vec<Shadow>,
    /// The verified token (for the decision record: what verification established).
    pub verified: Option<Arc<VerifiedToken>>,
    /// Whether the token's verification came from the verified-token cache (`None`: no token
    /// was verified). For traces.
    pub token_cached: Option<bool>,
    pub explain: Vec<ExplainStep>,
    /// Set when the token was refused only because its issuer's keys lack its `kid`: (issuer id,
    /// kid). The server may fetch the keys once and decide again; the engine does no I/O itself.
    pub unknown_key: Option<Box<(String, String)>>,
    /// The risk signals' counts the decision read that were not zero (a condition's
    /// `risk.<name>`, a `step_up` signal's), by signal name: its record keeps them, so replay
    /// decides it on the counts the server saw.
    pub risk_counts: Vec<(Arc<str>, u64)>,
    /// The client certificate presented with a token bound to one, as read: its thumbprint, or
    /// why it could not be read (boxed: most tokens are not bound).
    pub client_certificate: Option<Box<crate::identity::Presented>>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.outcome == Outcome::Allow
    }

    /// A decision with its outcome, reason, message and status, and nothing else yet.
    pub fn new(
        outcome: Outcome,
        reason: Reason,
        message: impl Into<Cow<'static, str>>,
        http_status: u16,
    ) -> Self {
        Self {
            outcome,
            reason,
            message: message.into(),
            rule: None,
            http_status,
            www_authenticate: None,
            step_up: None,
            principal: None,
            identity_headers: Vec::new(),
            stray_headers: Vec::new(),
            token_fingerprint: None,
            token_cached: None,
            block: None,
            shadow: Vec::new(),
            verified: None,
            explain: Vec::new(),
            unknown_key: None,
            risk_counts: Vec::new(),
            client_certificate: None,
        }
    }

    /// A denial made without the engine: for a request that failed before or while it was
    /// decided (a panic, a frame over the size limit). Nothing about the request is in it.
    pub fn refusal(http_status: u16, reason: Reason, message: &'static str) -> Self {
        Self::new(Outcome::Deny, reason, message, http_status)
    }

    /// stepgate failed to decide (a bug): `500 internal_error`, failing closed.
    pub fn internal_error() -> Self {
        Self::refusal(
            500,
            Reason::InternalError,
            "stepgate failed to decide this request; it is refused",
        )
    }
}
