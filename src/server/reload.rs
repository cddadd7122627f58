//! Policy reload: on SIGHUP, and when the policy file changes. A new policy is compiled and given
//! keys beside the old one, and swapped in only when it is complete. A policy that does not
//! compile is logged with its field path and counted, and the old one keeps serving.
//!
//! The file's folder is watched (inotify, through the `notify` crate) rather than the file:
//! editors replace a file by renaming another over it, and Kubernetes updates a mounted ConfigMap
//! by swapping the `..data` symlink its files point through, so the file itself never changes in
//! place. Events are debounced ([`DEBOUNCE`]); what decides a reload is the file's content, read
//! through every link, differing from the content last loaded (or last refused). The content is
//! also compared every [`RECHECK`], for file systems whose events do not arrive (some network and
//! overlay mounts), and when no watcher can be made at all.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::Authorizer;
use crate::{config, identity::keys, policy, telemetry::metrics};

/// Quiet time after a file event before the file is read: a ConfigMap update or an editor's save
/// is several events.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// How often the content is compared even without an event.
pub const RECHECK: Duration = Duration::from_secs(10);

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
    let (changed_tx, mut changed) = mpsc::channel::<()>(1);
    // Kept alive for as long as the task runs: dropping it stops the watching.
    let watcher = watch_file.then(|| watch_folder(&config_path, changed_tx));
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut refresh_tx = refresh_tx;
        let mut hup = hangup;
        let mut loaded = content_digest(&config_path);
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        loop {
            let forced = tokio::select! {
                () = hangup_signal(&mut hup) => true,
                Some(()) = changed.recv() => {
                    // More events of the same change: wait until they stop.
                    while tokio::time::timeout(DEBOUNCE, changed.recv()).await.is_ok_and(|e| e.is_some()) {}
                    false
                }
                _ = recheck.tick(), if watch_file => false,
                _ = stop.changed() => {
                    let _ = refresh_tx.send(true);
                    return;
                }
            };
            let now = content_digest(&config_path);
            if !forced && now == loaded {
                continue;
            }
            loaded = now;
            let why = if forced { "SIGHUP" } else { "the file changed" };
            let result = reload(&authorizer, &config_path, &http, why).await;
            metrics::global().record_reload(result.is_ok());
            match result {
                Ok(issuers) => {
                    let _ = refresh_tx.send(true);
                    let (tx, rx) = watch::channel(false);
                    refresh_tx = tx;
                    keys::spawn_refresh(issuers, http.clone(), rx);
                }
                Err(err) => tracing::error!(
                    config = %config_path.display(),
                    field = %err.path,
                    error = %err,
                    trigger = why,
                    "policy reload refused; the previous policy keeps serving"
                ),
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

/// Watches the folder holding `path`; each event sends on `changed` (dropped while one waits).
/// `None`, with a warning, when the folder cannot be watched: the periodic comparison remains.
fn watch_folder(path: &Path, changed: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watched = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = changed.try_send(());
        }
    })
    .and_then(|mut watcher| {
        watcher
            .watch(&folder, notify::RecursiveMode::NonRecursive)
            .map(|()| watcher)
    });
    match watched {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(
                folder = %folder.display(),
                %error,
                every = ?RECHECK,
                "cannot watch the policy file's folder; its content is compared periodically, and SIGHUP reloads"
            );
            None
        }
    }
}

/// SHA-256 of the file's content (through every link), or `None` when it cannot be read.
fn content_digest(path: &Path) -> Option<[u8; 32]> {
    std::fs::read(path)
        .ok()
        .map(|bytes| Sha256::digest(bytes).into())
}

async fn reload(
    authorizer: &Authorizer,
    path: &Path,
    http: &reqwest::Client,
    why: &str,
) -> Result<Vec<Arc<crate::identity::Issuer>>, config::ConfigError> {
    let file = config::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let fresh = policy::compile(&file, base)?;
    let old = authorizer.policy();
    // Carry keys over for unchanged issuers so an IdP outage during reload costs nothing.
    for issuer in fresh.issuers.iter() {
        if let Some(previous) = old.issuers.by_id(&issuer.id)
            && previous.issuer == issuer.issuer
            && previous.key_source == issuer.key_source
        {
            issuer.set_keys((*previous.keys()).clone());
            issuer.fetch.inherit(&previous.fetch);
            if let Some(discovered) = previous.discovered() {
                issuer.set_discovered((*discovered).clone());
            }
        }
    }
    let issuers: Vec<_> = fresh.issuers.iter().cloned().collect();
    keys::load_all(&issuers, http).await;
    let ids: Vec<&str> = issuers.iter().map(|i| &*i.id).collect();
    metrics::global().retain_issuers(&ids);
    authorizer.replace(Arc::new(fresh));
    tracing::info!(
        config = %path.display(),
        rules = authorizer.policy().rules.len(),
        trigger = why,
        "policy reloaded"
    );
    Ok(issuers)
}
