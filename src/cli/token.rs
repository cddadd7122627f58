//! `stepgate token`: mint a demo token. The defaults match the bundled demo policy.

use std::{path::PathBuf, process::ExitCode};

use jsonwebtoken::Algorithm;
use stepgate::{
    config::duration,
    demo::{self, TokenSpec},
    server::authorizer::unix_now,
};

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// Issuer: `entra` or `oidc` (the demo policy's two issuers) or a full `iss` URL.
    #[arg(long, default_value = "entra")]
    issuer: String,
    #[arg(long, default_value = demo::DEMO_AUDIENCE)]
    aud: String,
    #[arg(long, default_value = "alice")]
    sub: String,
    /// Entra authentication contexts, comma-separated (e.g. c1,c2).
    #[arg(long, value_delimiter = ',')]
    acrs: Vec<String>,
    /// The `acr` value (e.g. urn:okta:loa:2fa:any).
    #[arg(long)]
    acr: Option<String>,
    /// Authentication methods, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "pwd")]
    amr: Vec<String>,
    /// How long ago the user signed in (`auth_time` = now - this), e.g. 20m.
    #[arg(long, default_value = "0s")]
    auth_age: String,
    /// Leave `auth_time` out.
    #[arg(long)]
    no_auth_time: bool,
    /// Client capabilities (`xms_cc`), comma-separated; `cp1` lets the client receive claims challenges.
    #[arg(long, value_delimiter = ',')]
    xms_cc: Vec<String>,
    /// Delegated scopes (`scp`), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "user_impersonation")]
    scopes: Vec<String>,
    /// App roles, comma-separated.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Tenant id (`tid`).
    #[arg(long, default_value = "72f988bf-86f1-41af-91ab-2d7cd011db47")]
    tid: String,
    /// Lifetime, e.g. 1h (the token expires that long from now).
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Extra claims as name=JSON (e.g. --claim idtyp='"app"' --claim level=3).
    #[arg(long = "claim", value_parser = super::parse_name_json)]
    claims: Vec<(String, serde_json::Value)>,
    /// RS256 (demo RSA key) or ES256 (demo EC key).
    #[arg(long, default_value = "RS256")]
    alg: String,
    /// Private key (PEM, PKCS#8). Default: the demo key for --alg under examples/demo-keys/.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Key id for the header. Default: the demo key's.
    #[arg(long)]
    kid: Option<String>,
    /// Bind the token to this client certificate (PEM): `cnf` holds its `x5t#S256` (RFC 8705).
    #[arg(long, value_name = "PEM_FILE")]
    bound_to: Option<PathBuf>,
}

pub fn run(args: TokenArgs) -> ExitCode {
    match mint(args) {
        Ok(token) => {
            super::print_stdout(&format!("{token}\n"));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("stepgate token: {err}");
            ExitCode::from(2)
        }
    }
}

fn mint(args: TokenArgs) -> Result<String, String> {
    let issuer = match args.issuer.as_str() {
        "entra" => demo::DEMO_ENTRA_ISSUER.to_owned(),
        "oidc" => demo::DEMO_OIDC_ISSUER.to_owned(),
        url => url.to_owned(),
    };
    let alg: Algorithm = args
        .alg
        .parse()
        .map_err(|_| format!("unknown algorithm {:?}", args.alg))?;
    let (default_key, default_kid) = match alg {
        Algorithm::ES256 => ("demo-ec-private.pem", demo::DEMO_EC_KID),
        _ => ("demo-rsa-private.pem", demo::DEMO_RSA_KID),
    };
    let key_path = args
        .key
        .unwrap_or_else(|| demo_keys_dir().join(default_key));
    let pem =
        std::fs::read(&key_path).map_err(|e| format!("cannot read {}: {e}", key_path.display()))?;
    let mut spec = TokenSpec {
        issuer,
        audience: args.aud,
        subject: args.sub,
        tenant: Some(args.tid).filter(|t| !t.is_empty()),
        client_id: Some("stepgate-cli".to_owned()),
        acrs: args.acrs,
        acr: args.acr,
        amr: args.amr.into_iter().filter(|a| !a.is_empty()).collect(),
        auth_age: if args.no_auth_time {
            None
        } else {
            Some(
                duration::parse(&args.auth_age)
                    .map_err(|e| format!("--auth-age: {e}"))?
                    .0 as i64,
            )
        },
        xms_cc: args.xms_cc,
        scopes: args.scopes.into_iter().filter(|s| !s.is_empty()).collect(),
        roles: args.roles,
        lifetime: duration::parse(&args.ttl)
            .map_err(|e| format!("--ttl: {e}"))?
            .0 as i64,
        extra: args.claims.into_iter().collect(),
    };
    if let Some(path) = &args.bound_to {
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        use sha2::Digest as _;
        let der = CertificateDer::from_pem_file(path)
            .map_err(|e| format!("--bound-to {}: {e}", path.display()))?;
        let thumbprint: stepgate::identity::Thumbprint = sha2::Sha256::digest(&der).into();
        spec.extra.insert(
            "cnf".to_owned(),
            serde_json::json!({ "x5t#S256": stepgate::identity::thumbprint::encode(&thumbprint) }),
        );
    }
    demo::sign(
        &spec.claims(unix_now()),
        &pem,
        alg,
        args.kid.as_deref().unwrap_or(default_kid),
    )
}

/// `examples/demo-keys` of the source tree, or of the current folder.
fn demo_keys_dir() -> PathBuf {
    let here = PathBuf::from("examples/demo-keys");
    if here.exists() {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo-keys")
    }
}
