//! `stepgate.v1.AdminService`: blocks set, lifted and listed, and sessions revoked, by operators,
//! on the admin listener only (`--admin-listen`).
//!
//! A call is authenticated, then authorized, by the policy's `admin` section: a verified client
//! certificate naming one of `admin.client_sans`, or a bearer token (`authorization` metadata)
//! verified against the policy's issuers, of one of `admin.issuers`, carrying one of
//! `admin.roles`. No credential is `UNAUTHENTICATED` (an invalid token too: it says who nobody
//! is); a credential that grants nothing is `PERMISSION_DENIED`. A token is also held to the
//! blocks and revocations its decisions are: a blocked one is `PERMISSION_DENIED`, a revoked one
//! `UNAUTHENTICATED`, so that a stolen operator's token, once blocked, cannot lift its own block.
//! Each change is logged (target `stepgate::audit`, in the same log stream as the decisions) with
//! who made it; so is a blocked or revoked operator's refusal, at most once per
//! [`REFUSAL_LOG_EVERY`].
//!
//! What an operator writes (a block's value, a reason) is refused with a control character in it,
//! and logged only as `&str` fields, which the text log escapes and the JSON log quotes; never in
//! a line's message, and never with `%` (Display), which the text log writes as it is.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};

use super::{
    authorizer::{Authorizer, unix_now},
    conn::{ListenerKind, PeerInfo},
};
use crate::{
    api::v1::{
        self, BlockKind, BlockRequest, BlockResponse, BlockTarget, GetRiskCountsRequest,
        GetRiskCountsResponse, ListBlocksRequest, ListBlocksResponse, RevokeRequest,
        RevokeResponse, RiskCount, UnblockRequest, UnblockResponse,
        admin_service_server::AdminService,
    },
    identity::{Credential, bearer, fingerprint_of},
    risk::{
        blocks::{self, Block, BlockError, Kind, MAX_REASON_BYTES, MAX_TTL_SECONDS},
        revocations::{MAX_CLOCK_AHEAD_SECONDS, Revocation, RevokeError},
        signals::{KeyKind, Keys},
        store::Refusal,
    },
    telemetry::{metrics, throttle::Throttle},
};

/// At most one audit line per this period for blocked or revoked callers refused.
pub const REFUSAL_LOG_EVERY: Duration = crate::telemetry::throttle::WARNING_PERIOD;

#[derive(Debug, Clone)]
pub struct Admin {
    authorizer: Arc<Authorizer>,
}

impl Admin {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }

    /// Who is calling `call`, as the audit log names them, if the policy lets them.
    fn caller<T>(&self, request: &Request<T>, call: &'static str) -> Result<String, Status> {
        let peer = request.extensions().get::<PeerInfo>();
        if peer.map(|p| p.listener) != Some(ListenerKind::Admin) {
            return Err(Status::permission_denied(
                "the admin API is served on the admin listener (--admin-listen) only",
            ));
        }
        let policy = self.authorizer.policy();
        let admin = &policy.admin;
        let sans = peer
            .and_then(|p| p.client.as_deref())
            .map_or(&[][..], |c| &c.sans[..]);
        if let Some(san) = sans.iter().find(|san| admin.client_sans.contains(san)) {
            return Ok(format!("san:{san}"));
        }
        let Some(header) = request.metadata().get("authorization") else {
            return Err(if sans.is_empty() {
                Status::unauthenticated(
                    "present a client certificate (mutual TLS) or a bearer token (authorization \
                     metadata)",
                )
            } else {
                Status::permission_denied(
                    "the client certificate names none of the policy's admin.client_sans",
                )
            });
        };
        let raw = match header.to_str().map(bearer::from_authorization) {
            Ok(Credential::Bearer(raw)) => raw,
            _ => {
                return Err(Status::unauthenticated(
                    "the authorization metadata is not one bearer token",
                ));
            }
        };
        let now = unix_now();
        let (digest, verified, _) =
            policy
                .token_cache
                .verify(raw, &policy.issuers, policy.max_token_bytes, now);
        let token = verified
            .map_err(|e| Status::unauthenticated(format!("the bearer token is refused: {e}")))?;
        // A token bound to a client certificate (RFC 8705) is good only on a connection made
        // with it.
        let bound = token.certificate_binding.as_deref().copied();
        if let Some(bound) = bound {
            let presented = peer
                .and_then(|p| p.client.as_deref())
                .and_then(|c| c.thumbprint);
            if presented != Some(bound) {
                return Err(Status::unauthenticated(
                    "the bearer token is refused: it is bound to a client certificate (cnf \
                     x5t#S256) this connection was not made with",
                ));
            }
        }
        let principal = &token.principal;
        let granted = admin.issuers.iter().any(|id| **id == *principal.issuer_id)
            && principal
                .roles
                .iter()
                .any(|role| admin.roles.iter().any(|r| **r == **role));
        if !granted {
            return Err(Status::permission_denied(
                "the token's issuer and roles grant no admin right (admin.issuers, admin.roles)",
            ));
        }
        if !admin.audiences.is_empty()
            && !token_audiences(raw)
                .iter()
                .any(|aud| admin.audiences.contains(aud))
        {
            return Err(Status::permission_denied(
                "the token is not meant for the admin API: its aud holds none of admin.audiences",
            ));
        }
        // A role is not a sign-in: `admin.require` may ask for a step-up (an authentication
        // context, an acr, a recent sign-in) before a block is lifted or a session revoked.
        if let Some(rule) = &admin.rule {
            let decision = crate::decision::decide_token(&policy, rule, &token, bound, now);
            if !decision.is_allow() {
                return Err(Status::permission_denied(format!(
                    "the admin API asks for more than this token shows (admin.require): {}: {}",
                    decision.reason.as_str(),
                    decision.message
                )));
            }
        }
        let by = author(&principal.issuer_id, &principal.subject);
        // Held to what its decisions are held to: a stolen operator's token, once blocked or
        // revoked, must not be able to lift its block or block whoever is responding.
        let fingerprint = fingerprint_of(&digest);
        match self
            .authorizer
            .risk()
            .refusing(principal, Some(&fingerprint), now)
        {
            None => Ok(by),
            Some(refusal) => {
                log_refusal(call, &by, &refusal);
                Err(match refusal {
                    Refusal::Blocked(_) => Status::permission_denied("the caller is blocked"),
                    Refusal::Revoked(_) => Status::unauthenticated(
                        "the bearer token's session was revoked: sign in again",
                    ),
                })
            }
        }
    }
}

/// The `aud` of a token already verified (a string or an array of strings), read again from its
/// payload: the verified token keeps only what decisions read, and the admin API is rarely
/// called.
fn token_audiences(raw: &str) -> Vec<String> {
    use base64::Engine as _;
    let payload = raw.split('.').nth(1).unwrap_or_default();
    let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return Vec::new();
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|claims| claims.get("aud").cloned())
    {
        Some(serde_json::Value::String(aud)) => vec![aud],
        Some(serde_json::Value::Array(items)) => items
            .into_iter()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// The audit lines of blocked or revoked callers refused: at most one per
/// [`REFUSAL_LOG_EVERY`], all callers together, each saying how many refusals went unlogged
/// before it (every one is counted in `stepgate_admin_actions_total{result="refused"}`), so that
/// a refused caller calling in a loop cannot flood the log.
static REFUSALS: Throttle = Throttle::new(REFUSAL_LOG_EVERY);

fn log_refusal(call: &'static str, by: &str, refusal: &Refusal) {
    let Some(unlogged) = REFUSALS.admit() else {
        return;
    };
    let (why, kind, reason_id) = match refusal {
        Refusal::Blocked(block) => ("blocked", block.kind.as_str(), &*block.reason_id),
        Refusal::Revoked(revocation) => ("session_revoked", "subject", &*revocation.reason_id),
    };
    tracing::warn!(
        target: "stepgate::audit",
        action = "refused",
        call,
        by,
        why,
        kind,
        reason_id,
        unlogged,
        "admin: a blocked or revoked caller was refused"
    );
}

/// A reason id stepgate can pass on (no control character can be one), and a free-text reason.
fn check_reason(reason_id: &str, reason: &str) -> Result<(), Status> {
    if !blocks::valid_reason_id(reason_id) {
        return Err(Status::invalid_argument(
            "reason_id: 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    check_free_text(reason)
}

/// A free-text reason of bounded size, without control characters.
fn check_free_text(reason: &str) -> Result<(), Status> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(Status::invalid_argument(format!(
            "reason: at most {MAX_REASON_BYTES} bytes"
        )));
    }
    check_text("reason", reason)
}

/// [`blocks::check_text`], refused as `INVALID_ARGUMENT` naming `field`.
fn check_text(field: &str, text: &str) -> Result<(), Status> {
    blocks::check_text(field, text).map_err(Status::invalid_argument)
}

/// The time a revocation covers tokens issued before: `requested`, or with 0 ("now") the next
/// second, so that a token issued in the current second — before the call, at second precision
/// — is revoked too. At most [`MAX_CLOCK_AHEAD_SECONDS`] ahead of `now`.
fn revoked_before(requested: i64, now: i64) -> Result<i64, Status> {
    let before = if requested == 0 { now + 1 } else { requested };
    if before > now + MAX_CLOCK_AHEAD_SECONDS {
        return Err(Status::invalid_argument(
            "before: at most 5 minutes ahead of the server's clock",
        ));
    }
    Ok(before)
}

fn kind(target: Option<&BlockTarget>) -> Result<(Kind, &str), Status> {
    let target = target.ok_or_else(|| Status::invalid_argument("target is required"))?;
    let kind = match BlockKind::try_from(target.kind).unwrap_or(BlockKind::Unspecified) {
        BlockKind::Subject => Kind::Subject,
        BlockKind::Tenant => Kind::Tenant,
        BlockKind::ClientId => Kind::ClientId,
        BlockKind::Token => Kind::Token,
        BlockKind::TokenId => Kind::TokenId,
        BlockKind::Source => Kind::Source,
        BlockKind::Unspecified => {
            return Err(Status::invalid_argument("target.kind is required"));
        }
    };
    Ok((kind, &target.value))
}

fn to_wire(block: &Block) -> v1::Block {
    let kind = match block.kind {
        Kind::Subject => BlockKind::Subject,
        Kind::Tenant => BlockKind::Tenant,
        Kind::ClientId => BlockKind::ClientId,
        Kind::Token => BlockKind::Token,
        Kind::TokenId => BlockKind::TokenId,
        Kind::Source => BlockKind::Source,
    };
    v1::Block {
        target: Some(BlockTarget {
            kind: kind as i32,
            value: block.value.clone(),
        }),
        reason_id: block.reason_id.to_string(),
        reason: block.reason.clone(),
        created_at: block.created_at,
        expires_at: block.expires_at,
        created_by: block.created_by.clone(),
    }
}

fn revocation_to_wire(revocation: &Revocation) -> v1::Revocation {
    v1::Revocation {
        subject: revocation.subject.clone(),
        before: revocation.before,
        reason_id: revocation.reason_id.to_string(),
        reason: revocation.reason.clone(),
        created_at: revocation.created_at,
        created_by: revocation.created_by.clone(),
    }
}

fn refused(err: BlockError) -> Status {
    match err {
        BlockError::Invalid(why) => Status::invalid_argument(why),
        BlockError::Full | BlockError::FullOfSources | BlockError::FullForSignals => {
            Status::resource_exhausted(err.to_string())
        }
    }
}

impl Admin {
    async fn block_call(
        &self,
        request: Request<BlockRequest>,
    ) -> Result<Response<BlockResponse>, Status> {
        let by = self.caller(&request, "block")?;
        let request = request.into_inner();
        let (kind, value) = kind(request.target.as_ref())?;
        check_text("target.value", value)?;
        check_reason(&request.reason_id, &request.reason)?;
        if !(1..=MAX_TTL_SECONDS).contains(&request.ttl_seconds) {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds: 1 to {MAX_TTL_SECONDS} (90 days)"
            )));
        }
        let now = unix_now();
        let block = self
            .authorizer
            .risk()
            .set_block(
                Block {
                    kind,
                    value: value.to_owned(),
                    reason_id: Arc::from(request.reason_id.as_str()),
                    reason: request.reason,
                    created_at: now,
                    expires_at: now + request.ttl_seconds,
                    created_by: by.clone(),
                },
                now,
            )
            .map_err(refused)?;
        tracing::info!(
            target: "stepgate::audit",
            action = "block",
            by,
            kind = kind.as_str(),
            value = block.value.as_str(),
            reason_id = &*block.reason_id,
            reason = block.reason.as_str(),
            expires_at = block.expires_at,
            "admin: block set"
        );
        Ok(Response::new(BlockResponse {
            block: Some(to_wire(&block)),
        }))
    }

    async fn unblock_call(
        &self,
        request: Request<UnblockRequest>,
    ) -> Result<Response<UnblockResponse>, Status> {
        let by = self.caller(&request, "unblock")?;
        let request = request.into_inner();
        let (kind, value) = kind(request.target.as_ref())?;
        check_text("target.value", value)?;
        check_free_text(&request.reason)?;
        let removed = self
            .authorizer
            .risk()
            .remove_block(kind, value, unix_now())
            .map_err(refused)?;
        tracing::info!(
            target: "stepgate::audit",
            action = "unblock",
            by,
            kind = kind.as_str(),
            value,
            reason = request.reason.as_str(),
            removed,
            "admin: block lifted"
        );
        Ok(Response::new(UnblockResponse { removed }))
    }

    async fn list_blocks_call(
        &self,
        request: Request<ListBlocksRequest>,
    ) -> Result<Response<ListBlocksResponse>, Status> {
        self.caller(&request, "list")?;
        let now = unix_now();
        let blocks = self.authorizer.blocks().list(now);
        let revocations = self.authorizer.revocations().list(now);
        Ok(Response::new(ListBlocksResponse {
            blocks: blocks.iter().map(|b| to_wire(b)).collect(),
            revocations: revocations.iter().map(|r| revocation_to_wire(r)).collect(),
        }))
    }

    async fn revoke_call(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let by = self.caller(&request, "revoke")?;
        let request = request.into_inner();
        check_text("subject", &request.subject)?;
        check_reason(&request.reason_id, &request.reason)?;
        let now = unix_now();
        let before = revoked_before(request.before, now)?;
        let revocation = self
            .authorizer
            .risk()
            .revoke(
                Revocation {
                    subject: request.subject,
                    before,
                    reason_id: Arc::from(request.reason_id.as_str()),
                    reason: request.reason,
                    created_at: now,
                    created_by: by.clone(),
                },
                now,
            )
            .map_err(|e| match e {
                RevokeError::Invalid(why) => Status::invalid_argument(why),
                RevokeError::Full => Status::resource_exhausted(e.to_string()),
            })?;
        tracing::info!(
            target: "stepgate::audit",
            action = "revoke",
            by,
            kind = "subject",
            value = revocation.subject.as_str(),
            before = revocation.before,
            reason_id = &*revocation.reason_id,
            reason = revocation.reason.as_str(),
            "admin: sessions revoked"
        );
        Ok(Response::new(RevokeResponse {
            revocation: Some(revocation_to_wire(&revocation)),
        }))
    }
}

impl Admin {
    async fn risk_counts_call(
        &self,
        request: Request<GetRiskCountsRequest>,
    ) -> Result<Response<GetRiskCountsResponse>, Status> {
        self.caller(&request, "counts")?;
        let request = request.into_inner();
        let (kind, value) = kind(request.key.as_ref())?;
        let key_kind = match kind {
            Kind::Subject => KeyKind::Subject,
            Kind::Tenant => KeyKind::Tenant,
            Kind::ClientId => KeyKind::ClientId,
            Kind::Token => KeyKind::Token,
            Kind::Source => KeyKind::Source,
            Kind::TokenId => {
                return Err(Status::invalid_argument(
                    "key: no risk signal counts per token id (use the token's fingerprint)",
                ));
            }
        };
        let keys = Keys {
            subject: Some(value),
            tenant: Some(value),
            client_id: Some(value),
            token: Some(value),
            source: Some(value),
        };
        let policy = self.authorizer.policy();
        let now_ms = super::authorizer::unix_now_ms();
        let counts = policy
            .risk
            .signals
            .iter()
            .filter(|s| s.key == key_kind)
            .map(|signal| {
                // A source the signal cannot group (a CIDR) is looked up as given.
                let key = signal
                    .key_of(&keys)
                    .map_or_else(|| value.to_owned(), |k| k.into_owned());
                let count = signal.count(&key, now_ms);
                RiskCount {
                    signal: signal.name.to_string(),
                    counts: signal.event.as_str().to_owned(),
                    key,
                    count,
                    threshold: signal.threshold,
                    window_seconds: signal.window_seconds,
                    action: signal.action.as_str().to_owned(),
                    reached: signal.reached(count),
                }
            })
            .collect();
        Ok(Response::new(GetRiskCountsResponse { counts }))
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_risk_counts(
        &self,
        request: Request<GetRiskCountsRequest>,
    ) -> Result<Response<GetRiskCountsResponse>, Status> {
        counted("counts", self.risk_counts_call(request).await)
    }

    async fn block(
        &self,
        request: Request<BlockRequest>,
    ) -> Result<Response<BlockResponse>, Status> {
        counted("block", self.block_call(request).await)
    }

    async fn unblock(
        &self,
        request: Request<UnblockRequest>,
    ) -> Result<Response<UnblockResponse>, Status> {
        counted("unblock", self.unblock_call(request).await)
    }

    async fn list_blocks(
        &self,
        request: Request<ListBlocksRequest>,
    ) -> Result<Response<ListBlocksResponse>, Status> {
        counted("list", self.list_blocks_call(request).await)
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        counted("revoke", self.revoke_call(request).await)
    }
}

/// Counts a call in `stepgate_admin_actions_total{action,result}`.
fn counted<T>(action: &'static str, result: Result<T, Status>) -> Result<T, Status> {
    let outcome = match &result {
        Ok(_) => "ok",
        Err(status) if status.code() == tonic::Code::ResourceExhausted => "full",
        Err(_) => "refused",
    };
    metrics::global().record_admin_action(action, outcome);
    result
}

/// The `created_by` of what an admin token's caller blocks or revokes: `token:<issuer>/<subject>`,
/// or, for a subject that would make it longer than a record holds or that holds control
/// characters, its digest (`token:<issuer>/sha256:<hex>`). Every replica refuses a record with
/// such an author ([`crate::risk::blocks::check_record`]): the block would be enforced on the
/// replica that set it only, and a signal's could replace it in the shared store.
fn author(issuer_id: &str, subject: &str) -> String {
    let by = format!("token:{issuer_id}/{subject}");
    let fits = by.len() <= crate::risk::blocks::MAX_CREATED_BY_BYTES
        && crate::risk::blocks::check_text("created_by", &by).is_ok();
    if fits {
        by
    } else {
        format!(
            "token:{issuer_id}/sha256:{}",
            crate::identity::sha256_hex(subject, 32)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::revocations::Revocations;

    /// What an admin token's caller blocks is shared: its author is one every replica takes,
    /// whatever the token's subject.
    #[test]
    fn an_admin_callers_author_is_one_every_replica_takes() {
        assert_eq!(author("corp", "alice"), "token:corp/alice");
        for subject in [
            "u".repeat(1020),
            "a\u{7}b".to_owned(),
            "a\u{85}b".to_owned(),
        ] {
            let by = author("corp", &subject);
            assert!(by.starts_with("token:corp/sha256:"), "{by}");
            crate::risk::blocks::check_record("INC-1", "", &by).expect("taken everywhere");
        }
        assert_ne!(
            author("corp", &"u".repeat(1020)),
            author("corp", &"v".repeat(1020))
        );
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_revocation_now_covers_tokens_issued_in_the_current_second() {
        let before = revoked_before(0, NOW).unwrap();
        assert_eq!(before, NOW + 1);
        let revocations = Revocations::default();
        revocations
            .set(
                Revocation {
                    subject: "alice".to_owned(),
                    before,
                    reason_id: Arc::from("INC-1"),
                    reason: String::new(),
                    created_at: NOW,
                    created_by: "san:ops".to_owned(),
                },
                NOW,
            )
            .unwrap();
        assert!(
            revocations.revoking("alice", Some(NOW), NOW).is_some(),
            "issued in the second the revocation was made"
        );
        assert!(revocations.revoking("alice", Some(NOW - 1), NOW).is_some());
        assert!(
            revocations.revoking("alice", Some(NOW + 1), NOW).is_none(),
            "issued in a later second"
        );
    }

    #[test]
    fn an_explicit_revocation_time_means_issued_before_it() {
        assert_eq!(revoked_before(NOW - 60, NOW).unwrap(), NOW - 60);
        assert_eq!(revoked_before(NOW, NOW).unwrap(), NOW);
        assert_eq!(
            revoked_before(NOW + MAX_CLOCK_AHEAD_SECONDS, NOW).unwrap(),
            NOW + MAX_CLOCK_AHEAD_SECONDS
        );
        let refused = revoked_before(NOW + MAX_CLOCK_AHEAD_SECONDS + 1, NOW).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn free_text_with_a_control_character_is_refused_naming_its_field() {
        for (reason_id, reason, field) in [
            ("INC-1", "line\nINFO stepgate::audit: forged", "reason"),
            ("INC-1", "esc\u{1b}[2J", "reason"),
            ("INC-1", "nel\u{85}", "reason"),
            ("INC\n1", "", "reason_id"),
        ] {
            let refused = check_reason(reason_id, reason).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument);
            assert!(
                refused.message().starts_with(&format!("{field}:")),
                "{}",
                refused.message()
            );
        }
        assert!(check_reason("INC-1", "password reset, \"quoted\" by=x").is_ok());
        let refused = check_free_text(&"x".repeat(MAX_REASON_BYTES + 1)).unwrap_err();
        assert!(refused.message().starts_with("reason:"));
    }
}
