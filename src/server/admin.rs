//! `stepgate.v1.AdminService`: blocks set, lifted and listed, and sessions revoked, by operators,
//! on the admin listener only (`--admin-listen`).
//!
//! A call is authenticated, then authorized, by the policy's `admin` section: a verified client
//! certificate naming one of `admin.client_sans`, or a bearer token (`authorization` metadata)
//! verified against the policy's issuers, of one of `admin.issuers`, carrying one of
//! `admin.roles`. No credential is `UNAUTHENTICATED` (an invalid token too: it says who nobody
//! is); a credential that grants nothing is `PERMISSION_DENIED`. Each change is logged (target
//! `stepgate::audit`, in the same log stream as the decisions) with who made it.

use std::sync::Arc;

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
    identity::{Credential, bearer},
    risk::{
        blocks::{self, Block, BlockError, Kind, MAX_TTL_SECONDS},
        revocations::{Revocation, RevokeError},
        signals::{KeyKind, Keys},
    },
    telemetry::metrics,
};

/// Longest free-text reason kept (it is for operators and the audit log).
const MAX_REASON_BYTES: usize = 1024;
/// How far ahead of this server's clock a revocation time may be (another host's clock).
const MAX_CLOCK_AHEAD_SECONDS: i64 = 300;

#[derive(Debug, Clone)]
pub struct Admin {
    authorizer: Arc<Authorizer>,
}

impl Admin {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }

    /// Who is calling, as the audit log names them, if the policy lets them.
    fn caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
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
        let (_, verified, _) =
            policy
                .token_cache
                .verify(raw, &policy.issuers, policy.max_token_bytes, unix_now());
        let token = verified
            .map_err(|e| Status::unauthenticated(format!("the bearer token is refused: {e}")))?;
        let principal = &token.principal;
        let granted = admin.issuers.iter().any(|id| **id == *principal.issuer_id)
            && principal
                .roles
                .iter()
                .any(|role| admin.roles.iter().any(|r| **r == **role));
        if granted {
            Ok(format!(
                "token:{}/{}",
                principal.issuer_id, principal.subject
            ))
        } else {
            Err(Status::permission_denied(
                "the token's issuer and roles grant no admin right (admin.issuers, admin.roles)",
            ))
        }
    }
}

/// A reason id stepgate can pass on, and a free-text reason of bounded size.
fn check_reason(reason_id: &str, reason: &str) -> Result<(), Status> {
    if !blocks::valid_reason_id(reason_id) {
        return Err(Status::invalid_argument(
            "reason_id: 1 to 64 letters, digits, '-', '_' or '.'",
        ));
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(Status::invalid_argument(format!(
            "reason: at most {MAX_REASON_BYTES} bytes"
        )));
    }
    Ok(())
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
        BlockError::Full | BlockError::FullOfSources => Status::resource_exhausted(err.to_string()),
    }
}

impl Admin {
    async fn block_call(
        &self,
        request: Request<BlockRequest>,
    ) -> Result<Response<BlockResponse>, Status> {
        let by = self.caller(&request)?;
        let request = request.into_inner();
        let (kind, value) = kind(request.target.as_ref())?;
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
            value = %block.value,
            reason_id = %block.reason_id,
            reason = %block.reason,
            expires_at = block.expires_at,
            "admin: {} {} blocked",
            kind.as_str(),
            block.value
        );
        Ok(Response::new(BlockResponse {
            block: Some(to_wire(&block)),
        }))
    }

    async fn unblock_call(
        &self,
        request: Request<UnblockRequest>,
    ) -> Result<Response<UnblockResponse>, Status> {
        let by = self.caller(&request)?;
        let request = request.into_inner();
        let (kind, value) = kind(request.target.as_ref())?;
        if request.reason.len() > MAX_REASON_BYTES {
            return Err(Status::invalid_argument(format!(
                "reason: at most {MAX_REASON_BYTES} bytes"
            )));
        }
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
            reason = %request.reason,
            removed,
            "admin: {} {value} unblocked",
            kind.as_str()
        );
        Ok(Response::new(UnblockResponse { removed }))
    }

    async fn list_blocks_call(
        &self,
        request: Request<ListBlocksRequest>,
    ) -> Result<Response<ListBlocksResponse>, Status> {
        self.caller(&request)?;
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
        let by = self.caller(&request)?;
        let request = request.into_inner();
        check_reason(&request.reason_id, &request.reason)?;
        let now = unix_now();
        let before = if request.before == 0 {
            now
        } else {
            request.before
        };
        if before > now + MAX_CLOCK_AHEAD_SECONDS {
            return Err(Status::invalid_argument(
                "before: at most 5 minutes ahead of the server's clock",
            ));
        }
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
            value = %revocation.subject,
            before = revocation.before,
            reason_id = %revocation.reason_id,
            reason = %revocation.reason,
            "admin: sessions of {} issued before {} revoked",
            revocation.subject,
            revocation.before
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
        self.caller(&request)?;
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
