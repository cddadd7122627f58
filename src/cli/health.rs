//! `stepgate health`: asks a running server's `grpc.health.v1.Health/Check` and exits 0 when it
//! reports SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable, TLS refused).
//!
//! For the places a native gRPC probe cannot go: a Kubernetes exec probe or `helm test` against a
//! TLS or mutual-TLS listener (the kubelet's gRPC probe speaks plaintext only), and scripts. The
//! container image has no shell, and this needs none.

use std::{process::ExitCode, time::Duration};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::connect::{self, ClientTlsArgs};

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// Address of the server: http://host:port, or https://host:port with --ca.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// The service to ask about; empty: the whole server.
    #[arg(long, default_value = "")]
    service: String,
    /// How long connecting and the call may take, each; the whole check at most twice this
    /// (e.g. 3s).
    #[arg(long, default_value = "3s", value_parser = super::parse_positive_duration)]
    timeout: Duration,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

pub fn run(args: HealthArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stepgate health: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(check(&args)) {
        Ok(ServingStatus::Serving) => {
            super::print_stdout("SERVING\n");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            super::print_stdout(&format!("{}\n", status.as_str_name()));
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("stepgate health: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The whole check (connecting, the TLS handshake, the call) within twice `--timeout`: a peer
/// that accepts and then says nothing must not hang a probe.
async fn check(args: &HealthArgs) -> Result<ServingStatus, String> {
    let call = async {
        let channel = connect::channel(&args.server, &args.tls, args.timeout).await?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: args.service.clone(),
            })
            .await
            .map_err(|s| connect::status_text(&s))?;
        Ok(response.into_inner().status())
    };
    tokio::time::timeout(args.timeout * 2, call)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from {} within {:?}",
                args.server,
                args.timeout * 2
            ))
        })
}
