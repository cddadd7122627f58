//! Loading issuers' key sets, at start-up and then periodically in the background.
//!
//! A refresh that fails, or that returns no usable key, never replaces a set that has keys: an
//! identity-provider blip must not become an outage. Requests never wait on this module.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    issuer::{Issuer, KeySource},
    jwks::KeySet,
};

/// Largest JWKS document accepted (Entra's common key set is about 10 KiB).
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How soon a failed or empty load is retried.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(15);
/// `kid` prefix of the keys shipped under `examples/` for demos.
pub const DEMO_KID_PREFIX: &str = "stepgate-demo";

/// An HTTP client suitable for fetching key sets: bounded time, no redirects to other schemes.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::limited(3))
        .user_agent(concat!("stepgate/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client with static settings always builds")
}

/// Reads the issuer's key set from its source and installs it. Returns the number of keys.
pub async fn load(issuer: &Issuer, http: &reqwest::Client) -> Result<usize, String> {
    let result = load_inner(issuer, http).await;
    crate::telemetry::metrics::global().record_key_load(
        &issuer.id,
        result.as_ref().copied().map_err(|_| ()),
        crate::server::authorizer::unix_now(),
    );
    result
}

async fn load_inner(issuer: &Issuer, http: &reqwest::Client) -> Result<usize, String> {
    let bytes = match &issuer.key_source {
        KeySource::File(path) => tokio::fs::read(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        KeySource::Uri(uri) => fetch(http, uri).await?,
    };
    let (set, notes) = KeySet::parse(&bytes).map_err(|e| format!("unusable key set: {e}"))?;
    for note in notes {
        tracing::warn!(issuer = %issuer.id, "{note}");
    }
    if set.is_empty() {
        return Err("the key set holds no usable signing key".to_owned());
    }
    if set.kids().any(|kid| kid.starts_with(DEMO_KID_PREFIX)) {
        tracing::warn!(
            issuer = %issuer.id,
            "DEMO KEY IN USE: issuer {:?} trusts the demo signing key shipped with stepgate; \
             anyone can mint tokens for it. Never use this configuration in production.",
            issuer.issuer
        );
    }
    let count = set.len();
    issuer.set_keys(set);
    Ok(count)
}

async fn fetch(http: &reqwest::Client, uri: &str) -> Result<Vec<u8>, String> {
    let mut response = http
        .get(uri)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("GET {uri}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {uri}: HTTP {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("GET {uri}: {e}"))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!(
                "GET {uri}: key set larger than {MAX_JWKS_BYTES} bytes"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Loads every issuer's keys once, all issuers at the same time, logging each result. Returns the
/// ids of issuers left without keys.
pub async fn load_all(issuers: &[Arc<Issuer>], http: &reqwest::Client) -> Vec<String> {
    let mut loads = tokio::task::JoinSet::new();
    for issuer in issuers {
        let (issuer, http) = (Arc::clone(issuer), http.clone());
        loads.spawn(async move {
            let result = load(&issuer, &http).await;
            (issuer, result)
        });
    }
    let mut without_keys = Vec::new();
    while let Some(joined) = loads.join_next().await {
        let Ok((issuer, result)) = joined else {
            continue;
        };
        match result {
            Ok(count) => tracing::info!(issuer = %issuer.id, keys = count, "loaded signing keys"),
            Err(err) => {
                tracing::error!(issuer = %issuer.id, error = %err, "could not load signing keys");
                if issuer.keys().is_empty() {
                    without_keys.push(issuer.id.clone());
                }
            }
        }
    }
    without_keys.sort();
    without_keys
}

/// Refreshes each issuer's keys on its interval until `stop` changes. One task per issuer.
pub fn spawn_refresh(
    issuers: Vec<Arc<Issuer>>,
    http: reqwest::Client,
    stop: watch::Receiver<bool>,
) {
    for issuer in issuers {
        let http = http.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            loop {
                let wait = if issuer.keys().is_empty() {
                    RETRY_AFTER_FAILURE.min(issuer.refresh)
                } else {
                    issuer.refresh
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
                match load(&issuer, &http).await {
                    Ok(count) => {
                        tracing::debug!(issuer = %issuer.id, keys = count, "refreshed signing keys")
                    }
                    Err(err) => tracing::warn!(
                        issuer = %issuer.id, error = %err,
                        kept = issuer.keys().len(),
                        "key refresh failed; keeping the last good key set"
                    ),
                }
            }
        });
    }
}
