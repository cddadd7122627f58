//! Policy reload: on SIGHUP, and when the policy file changes (watched as [`super::files`] describes).
//! A new policy is compiled and given keys beside the old one, and swapped in only when it is
//! complete. A policy that does not compile, or one that adds or changes an issuer that then gets
//! no keys, is logged with its field path and counted, and the old one keeps serving.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use super::{Authorizer, files::FileWatch};
use crate::{
    config,
    identity::keys,
    policy,
    telemetry::{metrics, traces},
};

/// How long reading and compiling a new policy may take (100 000 rules took about 9 s).
const RELOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The SIGHUP stream (nothing where there are no signals).
#[cfg(unix)]
pub type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
pub type Hangup = ();

/// Starts the reload task; with `watch_file`, the policy file is watched too. Returns the stop
/// signal for the current key-refresh tasks; each successful reload stops those and starts
/// refresh tasks for the new issuers.
pub fn spawn(
    hangup: Hangup,
    authorizer: Arc<Authorizer>,
    config_path: PathBuf,
    http: reqwest::Client,
    watch_file: bool,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (refresh_tx, refresh_rx) = watch::channel(false);
    let mut file = if watch_file {
        FileWatch::new(vec![config_path.clone()], "policy file")
    } else {
        FileWatch::disabled()
    };
    tokio::spawn(async move {
        let mut refresh_tx = refresh_tx;
        let mut hup = hangup;
        // After a policy refused only because an issuer of it got no keys: when to try it again.
        let mut retry: Option<Pin<Box<tokio::time::Sleep>>> = None;
        // Tries of the same refused file in a row: each waits twice as long as the one before
        // (every try loads every issuer's keys again), up to 16 × NO_KEYS_RETRY.
        let mut retries: u32 = 0;
        loop {
            let why = tokio::select! {
                () = hangup_signal(&mut hup) => {
                    file.mark_seen().await;
                    "SIGHUP"
                }
                () = file.changed() => "the file changed",
                () = async { retry.as_mut().expect("guarded").await }, if retry.is_some() => {
                    retries += 1;
                    RETRYING
                }
                _ = stop.changed() => {
                    let _ = refresh_tx.send(true);
                    return;
                }
            };
            let mut span = traces::start_work(
                "stepgate policy reload",
                vec![opentelemetry::KeyValue::new("stepgate.trigger", why)],
            );
            if why != RETRYING {
                retries = 0;
            }
            retry = None;
            let result = reload(&authorizer, &config_path, &http, why).await;
            if let Err(refusal) = &result {
                span.failed(&refusal.error.to_string());
            }
            drop(span);
            metrics::global().record_reload(result.is_ok());
            match result {
                Ok(issuers) => {
                    let _ = refresh_tx.send(true);
                    let (tx, rx) = watch::channel(false);
                    refresh_tx = tx;
                    keys::spawn_refresh(issuers, http.clone(), rx);
                }
                Err(Refusal { error, retry_in }) => {
                    tracing::error!(
                        config = %config_path.display(),
                        field = %error.path,
                        error = %error,
                        trigger = why,
                        "policy reload refused; the previous policy keeps serving"
                    );
                    retry = retry_in
                        .map(|wait| Box::pin(tokio::time::sleep(wait * (1 << retries.min(4)))));
                }
            }
        }
    });
    refresh_rx
}

/// Resolves on SIGHUP (never where there are no signals).
#[cfg(unix)]
async fn hangup_signal(hup: &mut Hangup) {
    if hup.recv().await.is_none() {
        std::future::pending::<()>().await;
    }
}

#[cfg(not(unix))]
async fn hangup_signal(_: &mut Hangup) {
    std::future::pending::<()>().await;
}

/// How long after a policy refused for an issuer without keys the same file is tried again, the
/// first time (then twice as long each time, up to 8 minutes; a change of the file or SIGHUP
/// tries it at once).
pub const NO_KEYS_RETRY: Duration = Duration::from_secs(30);

/// The trigger of a retry.
const RETRYING: &str = "retrying a policy whose issuer had no keys";

/// Why a reload was refused, and whether trying the same file again later may succeed.
struct Refusal {
    error: config::ConfigError,
    retry_in: Option<Duration>,
}

impl From<config::ConfigError> for Refusal {
    fn from(error: config::ConfigError) -> Self {
        Self {
            error,
            retry_in: None,
        }
    }
}

async fn reload(
    authorizer: &Authorizer,
    path: &Path,
    http: &reqwest::Client,
    why: &str,
) -> Result<Vec<Arc<crate::identity::Issuer>>, Refusal> {
    // Read and compiled on a blocking thread: a large policy takes a while (10 000 rules about
    // 150 ms), and the worker running this task keeps serving its connections meanwhile.
    // A read that hangs (a stalled file system) or a compilation that never ends holds that
    // thread, not the reloads to come.
    let owned = path.to_owned();
    let compiling = tokio::task::spawn_blocking(move || {
        let file = config::load(&owned)?;
        policy::compile(&file, owned.parent().unwrap_or(Path::new(".")))
    });
    let fresh = tokio::time::timeout(RELOAD_TIMEOUT, compiling)
        .await
        .map_err(|_| {
            config::ConfigError::new(
                "",
                format!("reading and compiling the policy took more than {RELOAD_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| config::ConfigError::new("", format!("compiling the policy failed: {e}")))??;
    let old = authorizer.policy();
    // Carry keys over for unchanged issuers so an IdP outage during reload costs nothing.
    let mut fresh_enough = Vec::new();
    for issuer in fresh.issuers.iter() {
        // Not when the CAs it fetches through changed (a compromised CA replaced): keys fetched
        // under the old trust are fetched again.
        if let Some(previous) = old.issuers.by_id(&issuer.id)
            && previous.issuer == issuer.issuer
            && previous.key_source == issuer.key_source
            && previous.trust == issuer.trust
        {
            issuer.set_keys((*previous.keys()).clone());
            issuer.fetch.inherit(&previous.fetch);
            if let Some(discovered) = previous.discovered() {
                issuer.set_discovered((*discovered).clone());
            }
            // Fetched from its provider within `min_refresh`: not fetched again for the reload
            // (a config writer reloading many times a second would otherwise send the
            // provider as many requests; a key file is read again, for an operator who
            // replaced it and sent SIGHUP).
            if issuer.key_source.is_remote()
                && !issuer.keys().is_empty()
                && issuer.fetch.loaded_within(issuer.timing.min_refresh)
            {
                fresh_enough.push(Arc::clone(issuer));
            }
        }
    }
    let issuers: Vec<_> = fresh.issuers.iter().cloned().collect();
    // Until it is served, the candidate's key loads are not the serving issuers' metrics.
    for issuer in &issuers {
        issuer.fetch.hold_metrics();
    }
    let loading: Vec<_> = issuers
        .iter()
        .filter(|issuer| !fresh_enough.iter().any(|f| Arc::ptr_eq(f, issuer)))
        .cloned()
        .collect();
    let without_keys = keys::load_all(&loading, http).await;
    // An issuer the new policy adds or changes that got no keys (a wrong jwks_uri, a provider
    // not reachable from here) would have every one of its tokens refused and, with
    // --ready-when all-issuers, every replica report NOT_SERVING at once: the policy is refused
    // like one that does not compile. An issuer already without keys under the running policy
    // (its provider down) does not hold back other changes.
    let newly_without = issuers.iter().enumerate().find(|(_, issuer)| {
        without_keys.iter().any(|id| *id == *issuer.id)
            && old
                .issuers
                .by_id(&issuer.id)
                .is_none_or(|running| !running.keys().is_empty())
    });
    if let Some((index, issuer)) = newly_without {
        return Err(Refusal {
            error: config::ConfigError::new(
                format!("issuers[{index}]"),
                format!(
                    "no signing keys could be loaded for issuer {:?} (the key load error is \
                     logged above); tried again in {}s and then less often (up to every 8 \
                     minutes), or at once on SIGHUP or a change of the file",
                    issuer.id,
                    NO_KEYS_RETRY.as_secs()
                ),
            ),
            retry_in: Some(NO_KEYS_RETRY),
        });
    }
    let ids: Vec<&str> = issuers.iter().map(|i| &*i.id).collect();
    metrics::global().retain_issuers(&ids);
    // The replaced policy's issuers are no longer served: a refresh or an unknown-kid fetch of
    // theirs still running must not write over the metrics of the issuers that replace them.
    for issuer in old.issuers.iter() {
        issuer.fetch.hold_metrics();
    }
    for issuer in &issuers {
        issuer.fetch.serve(&issuer.id);
    }
    let rules: Vec<&str> = fresh.rules.iter().map(|r| &*r.id).collect();
    metrics::global().retain_rules(&rules);
    authorizer.replace(Arc::new(fresh));
    // The replaced policy is freed off the worker (100 000 rules take a while to drop; calls
    // still deciding under it free it wherever they end).
    tokio::task::spawn_blocking(move || drop(old));
    tracing::info!(
        config = %path.display(),
        rules = authorizer.policy().rules.len(),
        trigger = why,
        "policy reloaded"
    );
    Ok(issuers)
}
