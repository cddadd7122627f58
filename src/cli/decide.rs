//! `stepgate decide`: one decision, from a running server (`--server`) or offline (`--config`),
//! printed as JSON (the `DecideResponse` fields).

use std::{collections::HashMap, path::PathBuf, process::ExitCode};

use stepgate::{
    api::v1::{
        DecideRequest, DecideResponse, HttpRequest, decide_request::Credential,
        decision_service_client::DecisionServiceClient,
    },
    decision,
    identity::keys,
    request::RequestProblem,
    server::{
        authorizer::unix_now,
        decide::{access_request, decide_response},
    },
};

#[derive(Debug, clap::Args)]
pub struct DecideArgs {
    /// Address of a running stepgate, e.g. http://127.0.0.1:50051 (https:// with --ca).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    server: Option<String>,
    #[command(flatten)]
    tls: super::connect::ClientTlsArgs,
    /// Evaluate offline against this policy file instead of asking a server.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The raw access token.
    #[arg(long, conflicts_with = "authorization")]
    token: Option<String>,
    /// The raw Authorization header value ("Bearer …").
    #[arg(long)]
    authorization: Option<String>,
    /// Operation name, e.g. payments.wire_transfer.
    #[arg(long, default_value = "")]
    operation: String,
    /// HTTP method (with --path).
    #[arg(long)]
    method: Option<String>,
    /// HTTP request path (and query).
    #[arg(long)]
    path: Option<String>,
    #[arg(long)]
    host: Option<String>,
    /// Attribute for conditions, as name=JSON (e.g. --attr amount=25000).
    #[arg(long = "attr", value_parser = super::parse_name_json)]
    attributes: Vec<(String, serde_json::Value)>,
    /// Include the evaluation steps.
    #[arg(long)]
    explain: bool,
    /// The certificate (PEM) your client authenticated its TLS connection with, sent as the
    /// request's `client_certificate`: a token bound to a certificate (`cnf.x5t#S256`) needs it.
    /// Not --cert, which is stepgate's own client certificate for reaching the server.
    #[arg(long, value_name = "PEM_FILE")]
    client_certificate: Option<PathBuf>,
}

pub fn run(args: DecideArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stepgate decide: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let request = match build_request(&args) {
            Ok(request) => request,
            Err(message) => {
                eprintln!("stepgate decide: {message}");
                return ExitCode::from(2);
            }
        };
        let response = match (&args.server, &args.config) {
            (Some(server), _) => ask(server, &args.tls, request).await,
            (None, Some(config)) => offline(config, request).await,
            (None, None) => unreachable!("clap requires one of --server and --config"),
        };
        match response {
            Ok(response) => {
                super::print_stdout(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&to_json(&response)).expect("JSON of plain data")
                ));
                ExitCode::SUCCESS
            }
            Err((code, message)) => {
                eprintln!("stepgate decide: {message}");
                ExitCode::from(code)
            }
        }
    })
}

fn build_request(args: &DecideArgs) -> Result<DecideRequest, String> {
    let credential = match (&args.token, &args.authorization) {
        (Some(t), _) => Some(Credential::Token(t.clone())),
        (None, Some(a)) => Some(Credential::Authorization(a.clone())),
        (None, None) => None,
    };
    let http = (args.path.is_some() || args.method.is_some()).then(|| HttpRequest {
        method: args.method.clone().unwrap_or_else(|| "GET".to_owned()),
        host: args.host.clone().unwrap_or_default(),
        path: args.path.clone().unwrap_or_else(|| "/".to_owned()),
        headers: HashMap::new(),
    });
    let attributes = (!args.attributes.is_empty())
        .then(|| stepgate::api::json_to_struct(&args.attributes.iter().cloned().collect()));
    let client_certificate = match &args.client_certificate {
        None => Vec::new(),
        Some(path) => {
            use rustls_pki_types::{CertificateDer, pem::PemObject as _};
            CertificateDer::from_pem_file(path)
                .map_err(|e| format!("--client-certificate {}: {e}", path.display()))?
                .to_vec()
        }
    };
    Ok(DecideRequest {
        credential,
        operation: args.operation.clone(),
        http,
        attributes,
        explain: args.explain,
        client_certificate,
    })
}

async fn ask(
    server: &str,
    tls: &super::connect::ClientTlsArgs,
    request: DecideRequest,
) -> Result<DecideResponse, (u8, String)> {
    if request.credential.is_some() && !super::connect::private_transport(server) {
        return Err((
            1,
            format!(
                "the token would cross the network in the clear to {server}: use https:// \
                 (--ca), or a loopback address (kubectl port-forward)"
            ),
        ));
    }
    let channel = super::connect::channel(server, tls, std::time::Duration::from_secs(10))
        .await
        .map_err(|e| (1, e))?;
    let mut client = DecisionServiceClient::new(channel);
    client
        .decide(request)
        .await
        .map(|r| r.into_inner())
        .map_err(|s| (1, super::connect::status_text(&s)))
}

async fn offline(
    config: &std::path::Path,
    request: DecideRequest,
) -> Result<DecideResponse, (u8, String)> {
    let policy = super::load_policy(config)
        .map_err(|e| (2, format!("invalid policy {}: {e}", config.display())))?;
    let issuers: Vec<_> = policy.issuers.iter().cloned().collect();
    for issuer in &issuers {
        keys::load(issuer, &keys::http_client())
            .await
            .map_err(|e| (1, format!("issuer {}: {e}", issuer.id)))?;
    }
    let access = access_request(request, policy.header_limits);
    if let Some(problem @ RequestProblem::NothingToMatch) = &access.problem {
        return Err((2, problem.describe()));
    }
    let decision = decision::decide(&policy, &access, unix_now());
    Ok(decide_response(&decision, &policy.upstream))
}

/// An outcome's short name.
fn outcome_name(outcome: stepgate::api::v1::Outcome) -> &'static str {
    match outcome {
        stepgate::api::v1::Outcome::Allow => "ALLOW",
        stepgate::api::v1::Outcome::StepUp => "STEP_UP",
        stepgate::api::v1::Outcome::Deny => "DENY",
        stepgate::api::v1::Outcome::Unspecified => "UNSPECIFIED",
    }
}

/// The response as JSON with proto field names (and the outcome as its short name).
fn to_json(r: &DecideResponse) -> serde_json::Value {
    let mut out = serde_json::json!({
        "outcome": outcome_name(r.outcome()),
        "rule": r.rule,
        "reason": r.reason,
        "message": r.message,
        "http_status": r.http_status,
        "www_authenticate": r.www_authenticate,
        "identity_headers": r.identity_headers,
        "headers_to_remove": r.headers_to_remove,
        "token_fingerprint": r.token_fingerprint,
    });
    if let Some(s) = &r.step_up {
        out["step_up"] = serde_json::json!({
            "challenge_style": s.challenge_style,
            "auth_contexts": s.auth_contexts,
            "missing_auth_contexts": s.missing_auth_contexts,
            "acr_values": s.acr_values,
            "max_age_seconds": s.max_age_seconds,
            "amr": s.amr,
            "claims": s.claims,
            "claims_base64": s.claims_base64,
        });
    }
    if let Some(p) = &r.principal {
        out["principal"] = serde_json::json!({
            "issuer_id": p.issuer_id, "issuer": p.issuer, "subject": p.subject, "tenant": p.tenant,
            "client_id": p.client_id, "acrs": p.acrs, "acr": p.acr, "amr": p.amr,
            "auth_time": p.auth_time, "scopes": p.scopes, "roles": p.roles, "app_only": p.app_only,
            "expires_at": p.expires_at,
        });
    }
    if !r.block.is_empty() {
        out["block"] = r.block.clone().into();
    }
    if !r.shadow.is_empty() {
        out["shadow"] = r
            .shadow
            .iter()
            .map(|s| {
                serde_json::json!({
                    "rule": s.rule, "escalation": s.escalation,
                    "outcome": outcome_name(s.outcome()), "reason": s.reason,
                })
            })
            .collect();
    }
    if !r.explain.is_empty() {
        out["explain"] = r
            .explain
            .iter()
            .map(|s| serde_json::json!({"stage": s.stage, "detail": s.detail}))
            .collect();
    }
    out
}
