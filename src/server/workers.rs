//! The serving workers: each a thread with its own current-thread Tokio runtime, serving the
//! connections handed to it by the accept loops (`conn::Dispatch`).
//!
//! A connection lives on one worker from accept to close: its socket, its HTTP/2 state and its
//! calls are polled by that worker's thread only. Nothing moves between threads per request, so
//! workers neither park and wake each other nor steal each other's tasks, as a shared
//! work-stealing runtime's did on every burst (docs/performance.md, "Cores"). Worker 0 is the
//! runtime `stepgate serve` starts on, which also runs the background tasks (key refresh, policy
//! reload, readiness, metrics, the accept loops).

use std::{future::Future, sync::Arc};

use anyhow::{Context as _, anyhow};
use tokio::sync::{mpsc, oneshot, watch};

use super::conn::Accepted;

/// The workers started on threads of their own.
pub(super) struct Workers {
    finished: Vec<oneshot::Receiver<anyhow::Result<()>>>,
    /// Turned true once every worker has finished: their runtimes are dropped only then, since a
    /// task one of them started (a key fetch, a risk-store link) may serve the others until the
    /// last call is answered.
    exit: watch::Sender<bool>,
}

/// Starts a worker for each queue after the first, each on its own thread running `serve` on its
/// queue. Returns the first queue, for the caller's runtime to serve as worker 0.
pub(super) fn start<F, Fut>(
    mut queues: Vec<mpsc::UnboundedReceiver<Accepted>>,
    serve: Arc<F>,
) -> anyhow::Result<(mpsc::UnboundedReceiver<Accepted>, Workers)>
where
    F: Fn(mpsc::UnboundedReceiver<Accepted>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + 'static,
{
    let (exit, exiting) = watch::channel(false);
    let mut finished = Vec::with_capacity(queues.len().saturating_sub(1));
    let first = queues.remove(0);
    for (index, queue) in queues.into_iter().enumerate() {
        let number = index + 1;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .with_context(|| format!("cannot start the runtime of worker {number}"))?;
        let (done, done_rx) = oneshot::channel();
        let serve = Arc::clone(&serve);
        let mut exiting = exiting.clone();
        std::thread::Builder::new()
            .name(format!("stepgate-worker-{number}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let _ = done.send(serve(queue).await);
                    let _ = exiting.wait_for(|exit| *exit).await;
                });
            })
            .with_context(|| format!("cannot start the thread of worker {number}"))?;
        finished.push(done_rx);
    }
    Ok((first, Workers { finished, exit }))
}

impl Workers {
    /// Waits for every worker to finish, then lets their threads end. The first error is returned
    /// (a worker that panicked outside a call counts as one).
    pub(super) async fn finish(self) -> anyhow::Result<()> {
        let mut outcome = Ok(());
        for (index, done) in self.finished.into_iter().enumerate() {
            let result = done
                .await
                .unwrap_or_else(|_| Err(anyhow!("worker {} stopped unexpectedly", index + 1)));
            if outcome.is_ok() {
                outcome = result;
            }
        }
        let _ = self.exit.send(true);
        outcome
    }
}
