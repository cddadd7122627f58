//! Log lines are appended to a shared buffer and written to stderr by a background thread.
//!
//! Writing one line per decision straight to stderr costs a `write` syscall per request (5–14 µs
//! in the profile: the largest cost of a cached ALLOW after the network). Here the request path
//! only copies the formatted line into memory; the writer thread sends what accumulated every
//! [`FLUSH_EVERY`] or as soon as [`WAKE_AT`] bytes wait, in one `write`. Nothing is dropped: when
//! the buffer would pass [`BACKPRESSURE_AT`] bytes (stderr blocked or the writer without CPU) the
//! logging thread writes the buffer itself (also once a line has waited [`MAX_DELAY`]), so a stuck
//! log pipe slows decisions rather than losing audit lines. [`LogGuard`] flushes what is left when
//! the process ends.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread,
    time::{Duration, Instant},
};

use tracing_subscriber::fmt::MakeWriter;

/// Longest time a line waits in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Longest a line may wait when the writer thread gets no CPU: the next line logged after that
/// writes the buffer itself.
pub const MAX_DELAY: Duration = Duration::from_millis(250);
/// Pending bytes that wake the writer thread early.
pub const WAKE_AT: usize = 64 * 1024;
/// Pending bytes at which the logging thread writes synchronously. Both buffers are allocated
/// at this size once and never grow past it (no reallocation churn, a fixed 2 MiB).
pub const BACKPRESSURE_AT: usize = 1024 * 1024;

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

struct Pending {
    bytes: Vec<u8>,
    /// When the oldest pending byte was added.
    since: Option<Instant>,
    /// The writer was woken for these bytes: a condvar notify is a syscall every time, so the
    /// lines after [`WAKE_AT`] do not repeat it while the writer waits for CPU.
    woken: bool,
    closed: bool,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            bytes: Vec::with_capacity(BACKPRESSURE_AT),
            since: None,
            woken: false,
            closed: false,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only bytes behind: keep logging.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what is pending and writes it to `out`, outside the lock.
    fn drain_to(&self, out: &mut impl Write, spare: &mut Vec<u8>) {
        {
            let mut pending = self.lock();
            if pending.bytes.is_empty() {
                return;
            }
            std::mem::swap(&mut pending.bytes, spare);
            pending.since = None;
            pending.woken = false;
        }
        // stderr failing (closed pipe) must not take the service down; the lines are lost.
        let _ = out.write_all(spare).and_then(|()| out.flush());
        spare.clear();
    }
}

/// The `MakeWriter` handed to tracing-subscriber. Cloning shares the buffer.
#[derive(Clone)]
pub struct BufferedStderr {
    shared: Arc<Shared>,
}

/// Flushes the log buffer and stops the writer thread when dropped.
#[must_use = "dropping the guard flushes and stops log writing"]
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl BufferedStderr {
    /// Starts the writer thread. Falls back to writing on the logging thread if no thread can be
    /// spawned (the guard then flushes nothing, since nothing waits).
    pub fn start() -> (Self, LogGuard) {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("stepgate-log".into())
            .spawn(move || write_loop(&worker))
            .ok();
        if thread.is_none() {
            shared.lock().closed = true;
        }
        (
            Self {
                shared: Arc::clone(&shared),
            },
            LogGuard { shared, thread },
        )
    }
}

fn write_loop(shared: &Shared) {
    lowest_priority();
    let mut spare = Vec::with_capacity(BACKPRESSURE_AT);
    let stderr = io::stderr();
    loop {
        let closed = {
            let pending = shared.lock();
            let (pending, _) = shared
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| {
                    p.bytes.len() < WAKE_AT && !p.closed
                })
                .unwrap_or_else(PoisonError::into_inner);
            pending.closed
        };
        shared.drain_to(&mut stderr.lock(), &mut spare);
        if closed {
            return;
        }
    }
}

/// Gives this thread the lowest normal priority (nice 19, Linux): it still runs within a few
/// milliseconds on a busy core, but a flush rarely delays a request (measured through Envoy: the
/// decision line's flushes were most of stepgate's p99 at 1000 req/s). `SCHED_IDLE` was tried
/// and starves the writer whenever other processes keep the core busy.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `gettid` has no preconditions; `setpriority` on this thread's id changes only
        // its own nice value. A failure leaves the normal priority.
        unsafe {
            let tid = libc::gettid();
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
        }
    }
}

impl LogGuard {
    /// Writes everything logged so far (e.g. before printing an error straight to stderr).
    pub fn flush(&self) {
        self.shared
            .drain_to(&mut io::stderr().lock(), &mut Vec::new());
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.flush();
    }
}

/// One log line being written: appended to the shared buffer.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        if pending.closed {
            // No writer thread (any more): write through.
            drop(pending);
            return io::stderr().lock().write(buf);
        }
        let overdue = pending.since.is_some_and(|t| t.elapsed() > MAX_DELAY);
        if overdue || pending.bytes.len() + buf.len() > BACKPRESSURE_AT {
            // The writer thread is behind (stderr blocked, or no CPU for it): write here, holding
            // the lock, so that other loggers wait too instead of the buffer growing.
            let _ = io::stderr().lock().write_all(&pending.bytes);
            pending.bytes.clear();
            pending.since = None;
            pending.woken = false;
        }
        if pending.bytes.is_empty() {
            pending.since = Some(Instant::now());
        }
        pending.bytes.extend_from_slice(buf);
        let wake = pending.bytes.len() >= WAKE_AT && !pending.woken;
        pending.woken |= wake;
        drop(pending);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BufferedStderr {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: &self.shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(writer: &BufferedStderr) -> Vec<u8> {
        writer.shared.lock().bytes.clone()
    }

    #[test]
    fn lines_wait_in_the_buffer_in_order() {
        let shared = Arc::new(Shared::default());
        let writer = BufferedStderr {
            shared: Arc::clone(&shared),
        };
        writer.make_writer().write_all(b"one\n").unwrap();
        writer.make_writer().write_all(b"two\n").unwrap();
        assert_eq!(pending(&writer), b"one\ntwo\n");

        let mut out = Vec::new();
        shared.drain_to(&mut out, &mut Vec::new());
        assert_eq!(out, b"one\ntwo\n");
        assert!(pending(&writer).is_empty(), "drained bytes are gone");
    }

    #[test]
    fn a_full_buffer_wakes_the_writer_once_until_it_drains() {
        let shared = Arc::new(Shared::default());
        let writer = BufferedStderr {
            shared: Arc::clone(&shared),
        };
        let line = vec![b'x'; 1000];
        while shared.lock().bytes.len() < WAKE_AT - line.len() {
            writer.make_writer().write_all(&line).unwrap();
        }
        assert!(!shared.lock().woken, "below WAKE_AT the timer flushes");
        writer.make_writer().write_all(&line).unwrap();
        writer.make_writer().write_all(&line).unwrap();
        assert!(shared.lock().woken, "woken once at WAKE_AT");
        shared.drain_to(&mut Vec::new(), &mut Vec::new());
        assert!(!shared.lock().woken, "the next fill wakes it again");
    }

    #[test]
    fn the_guard_flushes_and_stops_the_thread() {
        let (writer, guard) = BufferedStderr::start();
        writer.make_writer().write_all(b"").unwrap();
        assert!(guard.thread.is_some(), "the writer thread started");
        drop(guard);
        assert!(writer.shared.lock().closed, "closed after the guard");
        assert!(pending(&writer).is_empty(), "nothing left behind");
    }
}
