//! `stepgate admin block|unblock|revoke|list|counts`: the admin API (`stepgate.v1.AdminService`) from the
//! command line, against a server's admin listener. Prints JSON; exits 1 when the server refuses
//! (the gRPC status and why on stderr).

use std::{process::ExitCode, time::Duration};

use stepgate::api::v1::{
    Block, BlockKind, BlockRequest, BlockTarget, GetRiskCountsRequest, ListBlocksRequest,
    Revocation, RevokeRequest, UnblockRequest, admin_service_client::AdminServiceClient,
};
use tonic::metadata::MetadataValue;

use super::connect::{self, ClientTlsArgs};

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Block a subject, tenant, client, token or source address for a while.
    Block {
        #[command(flatten)]
        target: Target,
        /// A short identifier (e.g. a ticket number); blocked requests carry it.
        #[arg(long)]
        reason_id: String,
        /// Free text for operators and the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// How long (e.g. 30m, 24h; at most 90 days).
        #[arg(long, value_parser = super::parse_positive_duration)]
        ttl: Duration,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Lift a block.
    Unblock {
        #[command(flatten)]
        target: Target,
        /// Why (for the audit log).
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// List the blocks in force and the revocations kept.
    List {
        #[command(flatten)]
        server: ServerArgs,
    },
    /// The risk signals' current counts for a subject, tenant, client, token or source.
    Counts {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        server: ServerArgs,
    },
    /// Revoke a subject's sessions: its tokens issued before a time are refused (401).
    Revoke {
        /// A token's `sub`.
        #[arg(long)]
        subject: String,
        /// Unix seconds; default: now.
        #[arg(long, default_value_t = 0)]
        before: i64,
        /// A short identifier (e.g. a ticket number).
        #[arg(long)]
        reason_id: String,
        /// Free text for operators and the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        server: ServerArgs,
    },
}

/// Exactly one target.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// A token's `sub`.
    #[arg(long)]
    subject: Option<String>,
    /// A token's tenant (`tid`).
    #[arg(long)]
    tenant: Option<String>,
    /// A token's client (`azp`, `appid`, `client_id`).
    #[arg(long)]
    client_id: Option<String>,
    /// One token, by the fingerprint the decision log shows (12 hex digits).
    #[arg(long)]
    token_fingerprint: Option<String>,
    /// One token, by its `jti` (or Entra `uti`).
    #[arg(long)]
    token_id: Option<String>,
    /// A source address or CIDR (Envoy's `source.address`).
    #[arg(long)]
    source: Option<String>,
}

impl Target {
    fn wire(&self) -> BlockTarget {
        let (kind, value) = [
            (BlockKind::Subject, &self.subject),
            (BlockKind::Tenant, &self.tenant),
            (BlockKind::ClientId, &self.client_id),
            (BlockKind::Token, &self.token_fingerprint),
            (BlockKind::TokenId, &self.token_id),
            (BlockKind::Source, &self.source),
        ]
        .into_iter()
        .find_map(|(kind, value)| Some((kind, value.clone()?)))
        .expect("clap requires one target");
        BlockTarget {
            kind: kind as i32,
            value,
        }
    }
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// The server's admin listener: http://host:port, or https://host:port with --ca.
    #[arg(long, env = "STEPGATE_ADMIN_SERVER")]
    server: String,
    /// A bearer token carrying an admin role (or use a client certificate: --cert, --key).
    #[arg(long, env = "STEPGATE_ADMIN_TOKEN", hide_env_values = true)]
    bearer: Option<String>,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

pub fn run(args: AdminArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stepgate admin: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(call(args.action)) {
        Ok(json) => {
            super::print_stdout(&format!(
                "{}\n",
                serde_json::to_string_pretty(&json).expect("JSON of plain data")
            ));
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("stepgate admin: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn call(action: Action) -> Result<serde_json::Value, String> {
    let server = match &action {
        Action::Block { server, .. }
        | Action::Unblock { server, .. }
        | Action::List { server }
        | Action::Counts { server, .. }
        | Action::Revoke { server, .. } => server,
    };
    if server.bearer.is_some() && !connect::private_transport(&server.server) {
        return Err(format!(
            "--bearer would send the admin token in the clear to {}: use https:// (--ca), or \
             reach the admin listener on loopback (kubectl port-forward, or exec in the pod)",
            server.server
        ));
    }
    let channel = connect::channel(&server.server, &server.tls, Duration::from_secs(10)).await?;
    let bearer = server
        .bearer
        .as_deref()
        .map(|token| {
            MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| "--bearer holds characters a header cannot".to_owned())
        })
        .transpose()?;
    let mut client =
        AdminServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(value) = &bearer {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        });
    let failed = |s: tonic::Status| connect::status_text(&s);
    match action {
        Action::Block {
            target,
            reason_id,
            reason,
            ttl,
            ..
        } => {
            let block = client
                .block(BlockRequest {
                    target: Some(target.wire()),
                    reason_id,
                    reason,
                    ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1),
                })
                .await
                .map_err(failed)?
                .into_inner()
                .block;
            Ok(block.as_ref().map_or(serde_json::Value::Null, block_json))
        }
        Action::Unblock { target, reason, .. } => {
            let removed = client
                .unblock(UnblockRequest {
                    target: Some(target.wire()),
                    reason,
                })
                .await
                .map_err(failed)?
                .into_inner()
                .removed;
            Ok(serde_json::json!({ "removed": removed }))
        }
        Action::List { .. } => {
            let listed = client
                .list_blocks(ListBlocksRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            Ok(serde_json::json!({
                "blocks": listed.blocks.iter().map(block_json).collect::<Vec<_>>(),
                "revocations": listed.revocations.iter().map(revocation_json).collect::<Vec<_>>(),
            }))
        }
        Action::Counts { target, .. } => {
            let counts = client
                .get_risk_counts(GetRiskCountsRequest {
                    key: Some(target.wire()),
                })
                .await
                .map_err(failed)?
                .into_inner()
                .counts;
            Ok(serde_json::json!({
                "counts": counts
                    .iter()
                    .map(|c| serde_json::json!({
                        "signal": c.signal,
                        "counts": c.counts,
                        "key": c.key,
                        "count": c.count,
                        "threshold": c.threshold,
                        "window_seconds": c.window_seconds,
                        "action": c.action,
                        "reached": c.reached,
                    }))
                    .collect::<Vec<_>>(),
            }))
        }
        Action::Revoke {
            subject,
            before,
            reason_id,
            reason,
            ..
        } => {
            let revocation = client
                .revoke(RevokeRequest {
                    subject,
                    before,
                    reason_id,
                    reason,
                })
                .await
                .map_err(failed)?
                .into_inner()
                .revocation;
            Ok(revocation
                .as_ref()
                .map_or(serde_json::Value::Null, revocation_json))
        }
    }
}

fn revocation_json(revocation: &Revocation) -> serde_json::Value {
    serde_json::json!({
        "subject": revocation.subject,
        "before": revocation.before,
        "reason_id": revocation.reason_id,
        "reason": revocation.reason,
        "created_at": revocation.created_at,
        "created_by": revocation.created_by,
    })
}

fn block_json(block: &Block) -> serde_json::Value {
    let target = block.target.clone().unwrap_or_default();
    let kind = BlockKind::try_from(target.kind).unwrap_or(BlockKind::Unspecified);
    serde_json::json!({
        "kind": kind.as_str_name().trim_start_matches("BLOCK_KIND_").to_lowercase(),
        "value": target.value,
        "reason_id": block.reason_id,
        "reason": block.reason,
        "created_at": block.created_at,
        "expires_at": block.expires_at,
        "created_by": block.created_by,
    })
}
