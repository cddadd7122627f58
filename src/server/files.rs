//! Watching files that stepgate reloads: the policy, and the TLS certificate, key and client CA.
//!
//! Each file's folder is watched (inotify, through the `notify` crate) rather than the file:
//! editors replace a file by renaming another over it, and Kubernetes updates a mounted ConfigMap
//! or Secret by swapping the `..data` symlink its files point through, so the file itself never
//! changes in place. Events are debounced ([`DEBOUNCE`]); what counts as a change is the files'
//! content, read through every link, differing from the content last seen. The content is also
//! compared every [`RECHECK`], for file systems whose events do not arrive (some network and
//! overlay mounts), and when no watcher can be made at all.
//!
//! - **Only whole files.** A change counts once two readings [`DEBOUNCE`] apart agree: a file
//!   rewritten in place (`cat >`, `scp`, `kubectl cp`) is not read half-written while the
//!   writer is at work. A writer that stops half-way for good still leaves half a file, which
//!   may well parse: replace files by renaming a complete one over them (docs/operations.md).
//! - **Only regular files, bounded** ([`read_file`]): a FIFO, a device or a file over
//!   [`crate::config::MAX_FILE_BYTES`] is refused, not read, so that no file put in the policy's
//!   place can stall a reader or fill the memory.
//! - **Never on a serving thread.** Once the server is up, files are read on a blocking thread,
//!   waited for at most [`READ_TIMEOUT`]: a read that hangs (a stalled network mount) holds that
//!   thread, never a worker, and no second read of the same files starts until it returns. (The
//!   first reading, which sets what counts as seen, is made at start, where the files were just
//!   read to start.)
//! - **Only writes are events.** inotify also reports a file being opened and read, and the
//!   digest itself opens the files: counting those would make every reading the next event, a
//!   re-read of the policy four times a second for ever. Opens, reads and closes after reading
//!   are ignored ([`is_change`]); so are other processes reading the folder (a log shipper).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sha2::{Digest, Sha256};

use crate::config::read_file;
use tokio::{sync::mpsc, task::JoinHandle, time::Interval};

/// Quiet time after a file event before the files are read: a ConfigMap update or an editor's
/// save is several events.
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// How often the content is compared even without an event.
pub const RECHECK: Duration = Duration::from_secs(10);
/// The longest wait for events to stop before the files are read all the same: a file written
/// without pause (a log beside the policy) must not hold a change back for ever.
pub const MAX_SETTLE: Duration = Duration::from_secs(2);
/// How long a reading of the watched files is waited for.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The files' content as a digest ([`digest`]); `None` when one of them could not be read.
type Content = Option<[u8; 32]>;

/// A set of files whose content is watched for changes.
pub struct FileWatch {
    paths: Arc<[PathBuf]>,
    what: &'static str,
    /// The content last seen.
    seen: Content,
    /// A reading that did not finish in [`READ_TIMEOUT`], still running on its thread.
    reading: Option<JoinHandle<Content>>,
    events: mpsc::Receiver<()>,
    recheck: Option<Interval>,
    // Kept alive for as long as the watch: dropping it stops the watching.
    _watcher: Option<notify::RecommendedWatcher>,
}

impl FileWatch {
    /// Watches `paths` (`what` names them in warnings). The content as it is now counts as seen:
    /// read here, before the watch is handed to its task, so that a change made as soon as the
    /// server is up is a change (a regular file of bounded size; at start-up, when the same
    /// files were just read to start).
    pub fn new(paths: Vec<PathBuf>, what: &'static str) -> Self {
        let (tx, events) = mpsc::channel(1);
        let watcher = watch_folders(&paths, tx, what);
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.reset();
        Self {
            seen: digest(&paths),
            paths: paths.into(),
            what,
            reading: None,
            events,
            recheck: Some(recheck),
            _watcher: watcher,
        }
    }

    /// A watch that never reports a change.
    pub fn disabled() -> Self {
        let (_, events) = mpsc::channel(1);
        Self {
            paths: Arc::new([]),
            what: "",
            seen: None,
            reading: None,
            events,
            recheck: None,
            _watcher: None,
        }
    }

    /// Resolves once the content differs from what was last seen (which it then becomes), and
    /// two readings [`DEBOUNCE`] apart agree on it. Cancel-safe: dropped half-way, nothing is
    /// marked seen.
    pub async fn changed(&mut self) {
        loop {
            let Some(recheck) = &mut self.recheck else {
                return std::future::pending().await;
            };
            tokio::select! {
                Some(()) = self.events.recv() => {
                    // More events of the same change: wait until they stop, or for
                    // `MAX_SETTLE` at most.
                    let settled = tokio::time::sleep(MAX_SETTLE);
                    tokio::pin!(settled);
                    loop {
                        tokio::select! {
                            more = tokio::time::timeout(DEBOUNCE, self.events.recv()) => {
                                if !more.is_ok_and(|event| event.is_some()) {
                                    break;
                                }
                            }
                            () = &mut settled => break,
                        }
                    }
                }
                _ = recheck.tick() => {}
            }
            let Some(now) = self.digest().await else {
                continue;
            };
            if now == self.seen {
                continue;
            }
            // Still being written? Read again once the writer has had time to go on.
            tokio::time::sleep(DEBOUNCE).await;
            if self.digest().await == Some(now) {
                self.seen = now;
                return;
            }
        }
    }

    /// Counts the content as it is now as seen (after a reload that another trigger started).
    pub async fn mark_seen(&mut self) {
        if self.recheck.is_some()
            && let Some(now) = self.digest().await
        {
            self.seen = now;
        }
    }

    /// The files' content now, read on a blocking thread; `None` when no reading finished (one
    /// still running from before, or this one past [`READ_TIMEOUT`]: it goes on, and is waited
    /// for before the next).
    async fn digest(&mut self) -> Option<Content> {
        let mut reading = match self.reading.take() {
            Some(earlier) if !earlier.is_finished() => {
                self.reading = Some(earlier);
                return None;
            }
            _ => {
                let paths = Arc::clone(&self.paths);
                tokio::task::spawn_blocking(move || digest(&paths))
            }
        };
        match tokio::time::timeout(READ_TIMEOUT, &mut reading).await {
            Ok(done) => Some(done.unwrap_or(None)),
            Err(_) => {
                tracing::warn!(
                    what = self.what,
                    timeout = ?READ_TIMEOUT,
                    "reading the {} did not finish in time (a stalled file system?); it is read again once that reading returns",
                    self.what
                );
                self.reading = Some(reading);
                None
            }
        }
    }
}

/// Whether an event on `paths` may change the watched files, whose names are `names`: one of
/// them written or renamed over, or a Kubernetes volume's `..data` swap (its `..`-names), or an
/// event that names no path. Other files in the folder (a log or decision records written
/// beside the policy) are not events.
fn concerns(paths: &[PathBuf], names: &BTreeSet<std::ffi::OsString>) -> bool {
    paths.is_empty()
        || paths.iter().any(|path| {
            path.file_name().is_none_or(|name| {
                names.contains(name) || name.as_encoded_bytes().starts_with(b"..")
            })
        })
}

/// Watches the folders holding `paths`; each event sends on `changed` (dropped while one waits).
/// `None`, with a warning, when a folder cannot be watched: the periodic comparison remains.
fn watch_folders(
    paths: &[PathBuf],
    changed: mpsc::Sender<()>,
    what: &str,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    // Each file and every link on its way to its content (`policy.yaml -> current ->
    // policy-v7.yaml`, in this folder or another): their folders are watched, and an event on any
    // of their names is a change (a target edited in place or replaced by a rename).
    let hops: Vec<PathBuf> = paths.iter().flat_map(|p| links_of(p)).collect();
    let folders: BTreeSet<PathBuf> = hops.iter().map(|p| folder_of(p)).collect();
    let names: BTreeSet<std::ffi::OsString> = hops
        .iter()
        .filter_map(|p| p.file_name().map(ToOwned::to_owned))
        .collect();
    let watched = folders.clone();
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // An error (the event queue overflowed) may hide a change: compare the content.
            let relevant = match event {
                Err(_) => true,
                Ok(event) => {
                    is_change(&event.kind)
                        && (concerns(&event.paths, &names)
                            // The folder itself moved or deleted (replaced by a new one).
                            || event.paths.iter().any(|p| watched.contains(p)))
                }
            };
            if relevant {
                let _ = changed.try_send(());
            }
        }) {
            Ok(watcher) => watcher,
            Err(error) => {
                warn_unwatched(what, None, &error);
                return None;
            }
        };
    for folder in &folders {
        if let Err(error) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
            warn_unwatched(what, Some(folder), &error);
            return None;
        }
    }
    Some(watcher)
}

/// Whether an event can be a change of content: anything but a file being opened, read, or
/// closed after reading (a close after writing is the end of a write, and counts; so does an
/// access of a kind the backend could not name).
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_)
                | AccessKind::Read
                | AccessKind::Close(AccessMode::Read | AccessMode::Execute)
        )
    )
}

fn warn_unwatched(what: &str, folder: Option<&Path>, error: &notify::Error) {
    tracing::warn!(
        folder = %folder.map(|f| f.display().to_string()).unwrap_or_default(),
        %error,
        every = ?RECHECK,
        "cannot watch the {what}'s folder; its content is compared periodically"
    );
}

/// `path`, then each link it leads through (at most 8 hops), each relative hop read against its
/// link's folder.
fn links_of(path: &Path) -> Vec<PathBuf> {
    let mut hops = vec![path.to_path_buf()];
    while hops.len() <= 8 {
        let last = hops.last().expect("one at least");
        let Ok(target) = std::fs::read_link(last) else {
            break;
        };
        let next = if target.is_absolute() {
            target
        } else {
            folder_of(last).join(target)
        };
        hops.push(next);
    }
    hops
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// SHA-256 over the files' contents (through every link), or `None` when one cannot be read.
fn digest(paths: &[PathBuf]) -> Content {
    let mut hash = Sha256::new();
    for path in paths {
        let bytes = read_file(path).ok()?;
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(bytes);
    }
    Some(hash.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new, empty folder of this process's for test `name`.
    fn empty_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stepgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A file beside the policy written without pause (a log, decision records) neither hides a
    /// change of the policy nor counts as one: the edit is reported within seconds.
    #[tokio::test]
    async fn a_busy_neighbour_file_does_not_hide_a_change() {
        let dir = empty_dir("busy-neighbour");
        let path = dir.join("policy.yaml");
        std::fs::write(&path, "rules: []\n").unwrap();
        let mut watch = FileWatch::new(vec![path.clone()], "test file");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (log, stop) = (dir.join("stepgate.log"), Arc::clone(&stop));
            move || {
                use std::io::Write as _;
                let mut f = std::fs::File::create(log).unwrap();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    writeln!(f, "a log line").unwrap();
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        // The neighbour alone is no change.
        let quiet = tokio::time::timeout(DEBOUNCE * 8, watch.changed()).await;
        assert!(
            quiet.is_err(),
            "a neighbour's writes were reported as a change"
        );
        std::fs::write(dir.join("new.yaml"), "rules: [] # edited\n").unwrap();
        std::fs::rename(dir.join("new.yaml"), &path).unwrap();
        // Well within the periodic comparison: the event itself is seen.
        let seen = tokio::time::timeout(RECHECK / 2, watch.changed()).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            seen.is_ok(),
            "the policy edit was not reported while a neighbour file was busy"
        );
    }

    /// A policy that is a link, through another link, to a file of another folder
    /// (`policy.yaml -> current -> ../releases/policy-v7.yaml`): an edit of the target is an
    /// event, seen at once rather than at the next comparison.
    #[tokio::test]
    async fn an_edit_of_a_linked_policys_target_is_an_event() {
        let dir = empty_dir("linked-target");
        let releases = dir.join("releases");
        let conf = dir.join("conf");
        std::fs::create_dir_all(&releases).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(releases.join("policy-v7.yaml"), "rules: []\n").unwrap();
        std::os::unix::fs::symlink("../releases/policy-v7.yaml", conf.join("current")).unwrap();
        std::os::unix::fs::symlink("current", conf.join("policy.yaml")).unwrap();
        let mut watch = FileWatch::new(vec![conf.join("policy.yaml")], "test file");
        tokio::time::sleep(DEBOUNCE).await;
        std::fs::write(releases.join("new.yaml"), "rules: [] # edited\n").unwrap();
        std::fs::rename(releases.join("new.yaml"), releases.join("policy-v7.yaml")).unwrap();
        let seen = tokio::time::timeout(RECHECK / 2, watch.changed()).await;
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            seen.is_ok(),
            "the edit of the link's target was not seen within 5 s"
        );
    }

    #[test]
    fn events_concern_the_watched_names_and_kubernetes_swaps_only() {
        let names: BTreeSet<std::ffi::OsString> = ["policy.yaml".into()].into();
        let event =
            |paths: &[&str]| concerns(&paths.iter().map(PathBuf::from).collect::<Vec<_>>(), &names);
        assert!(event(&["/etc/stepgate/policy.yaml"]));
        assert!(event(&["/etc/stepgate/..data_tmp", "/etc/stepgate/..data"]));
        assert!(event(&["/etc/stepgate/..2026_12_06_20_00_00.123"]));
        assert!(event(&[]), "an event without a path may be anything");
        assert!(
            event(&["/etc/stepgate/new.yaml", "/etc/stepgate/policy.yaml"]),
            "a rename over it"
        );
        assert!(!event(&["/etc/stepgate/stepgate.log"]));
        assert!(!event(&["/etc/stepgate/policy.yaml.swp"]));
    }

    /// A file written in place with pauses longer than the debounce is reported once the writer
    /// has finished, never half-written.
    #[tokio::test]
    async fn a_file_written_in_pieces_is_reported_once_whole() {
        let dir = empty_dir("pieces");
        let path = dir.join("policy.yaml");
        std::fs::write(&path, "first version\n").unwrap();
        let mut watch = FileWatch::new(vec![path.clone()], "test file");
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = tokio::spawn({
            let (path, done) = (path.clone(), Arc::clone(&done));
            async move {
                use std::io::Write as _;
                let mut file = std::fs::File::create(&path).unwrap();
                for piece in 0..6 {
                    if piece > 0 {
                        tokio::time::sleep(DEBOUNCE + Duration::from_millis(50)).await;
                    }
                    writeln!(file, "piece {piece}").unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        tokio::time::timeout(Duration::from_secs(20), watch.changed())
            .await
            .expect("the change was not seen within 20 s");
        assert!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            "reported while the writer was still at work"
        );
        assert_eq!(watch.seen, digest(std::slice::from_ref(&path)));
        writer.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Reading the watched files, as the digest itself and any other reader of the folder does,
    /// is no event: counted as one, each reading would start the next (a re-read of the policy
    /// four times a second for as long as the server runs). A write is one.
    #[tokio::test]
    async fn reading_a_file_is_no_event_and_writing_it_is() {
        let dir = empty_dir("reads");
        let path = dir.join("policy.yaml");
        std::fs::write(&path, "rules: []\n").unwrap();
        let mut watch = FileWatch::new(vec![path.clone()], "test file");

        for _ in 0..3 {
            std::fs::read(&path).unwrap();
        }
        assert!(watch.digest().await.is_some());
        // inotify events reach the channel from notify's thread: give them time to arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            matches!(
                watch.events.try_recv(),
                Err(mpsc::error::TryRecvError::Empty)
            ),
            "reading the file was reported as an event"
        );

        std::fs::write(&path, "rules: [] # edited\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.events.recv())
            .await
            .expect("writing the file was not reported within 5 s")
            .expect("the watcher stopped");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_symlink_swap_is_a_change_and_rewriting_the_same_content_is_not() {
        let dir = empty_dir("files");
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        std::fs::create_dir_all(dir.join("v2")).unwrap();
        std::fs::write(dir.join("v1/a.pem"), "one").unwrap();
        std::fs::write(dir.join("v2/a.pem"), "two").unwrap();
        std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/a.pem", dir.join("a.pem")).unwrap();
        let mut watch = FileWatch::new(vec![dir.join("a.pem")], "test file");

        // The same content written again: no change within a few debounce periods.
        std::fs::write(dir.join("v1/a.pem"), "one").unwrap();
        let same = tokio::time::timeout(DEBOUNCE * 4, watch.changed()).await;
        assert!(same.is_err(), "unchanged content was reported as a change");

        // The ConfigMap-style swap: a new link renamed over `..data`.
        std::os::unix::fs::symlink("v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("the swap was not seen within 5 s");
        assert_eq!(watch.seen, digest(&[dir.join("a.pem")]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
