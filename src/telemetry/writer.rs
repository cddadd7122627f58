//! Log lines are appended to a shared buffer and written to stderr by a background thread.
//!
//! Writing one line per decision straight to stderr costs a `write` syscall per request (5–14 µs
//! in the profile: the largest cost of a cached ALLOW after the network). Here the request path
//! only copies the formatted line into memory; the writer thread sends what accumulated every
//! [`FLUSH_EVERY`] or as soon as [`WAKE_AT`] bytes wait, in one `write`. With nothing to write it
//! sleeps until a line arrives, so an idle server's log thread does not wake.
//!
//! The request path never waits for stderr. When the buffer holds [`CAPACITY`] bytes (stderr
//! blocked: a log shipper that stopped reading, a full pipe; or the writer without CPU), further
//! lines are dropped and counted (`stepgate_log_lines_dropped_total`), as Envoy's access logs and
//! OPA's decision logs do, and a line saying how many went missing is written once stderr takes
//! lines again. The alternative, a worker writing the buffer itself, let one stuck pipe stall
//! every worker holding the lock: every decision, and health with them. [`LogGuard`] flushes what
//! is left when the process ends, waiting a bounded time for a blocked stderr.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

use super::metrics;

/// Longest a line waits in memory while stderr takes lines.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Pending bytes that wake the writer thread early.
pub const WAKE_AT: usize = 64 * 1024;
/// Pending bytes past which lines are dropped. Both buffers are allocated at this size once and
/// never grow past it (no reallocation churn, a fixed 2 MiB).
pub const CAPACITY: usize = 1024 * 1024;
/// How long the end of the process waits for the last lines to be written to a blocked stderr.
pub const EXIT_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Notified when the writer thread has ended.
    done: Condvar,
}

struct Pending {
    bytes: Vec<u8>,
    /// The writer was woken for these bytes: a condvar notify is a syscall every time, so the
    /// lines after [`WAKE_AT`] do not repeat it while the writer waits for CPU.
    woken: bool,
    /// The writer sleeps until a line arrives (nothing was pending when it last looked): the
    /// first line wakes it, the ones after it wait for its timer.
    idle: bool,
    /// Lines dropped since the writer last said so.
    dropped: u64,
    closed: bool,
    /// The writer thread has ended (or never started).
    finished: bool,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            bytes: Vec::with_capacity(CAPACITY),
            woken: false,
            idle: false,
            dropped: 0,
            closed: false,
            finished: false,
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only bytes behind: keep logging.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what is pending and writes it to `out`, outside the lock. Returns how many lines
    /// had been dropped before these were taken.
    fn drain_to(&self, out: &mut impl Write, spare: &mut Vec<u8>) -> u64 {
        let dropped = {
            let mut pending = self.lock();
            std::mem::swap(&mut pending.bytes, spare);
            pending.woken = false;
            std::mem::take(&mut pending.dropped)
        };
        if !spare.is_empty() {
            // stderr failing (closed pipe) must not take the service down; the lines are lost.
            let _ = out.write_all(spare).and_then(|()| out.flush());
            spare.clear();
        }
        dropped
    }

    /// Appends one line, or drops it when the buffer is full. Never waits for stderr.
    fn append(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.bytes.len() + line.len() > CAPACITY {
            pending.dropped += 1;
            drop(pending);
            metrics::global().record_log_line_dropped();
            return;
        }
        pending.bytes.extend_from_slice(line);
        let wake = (pending.idle || pending.bytes.len() >= WAKE_AT) && !pending.woken;
        pending.woken |= wake;
        pending.idle = false;
        drop(pending);
        if wake {
            self.wake.notify_one();
        }
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
            let mut pending = shared.lock();
            pending.closed = true;
            pending.finished = true;
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
    let mut spare = Vec::with_capacity(CAPACITY);
    let stderr = io::stderr();
    loop {
        let closed = {
            let mut pending = shared.lock();
            if pending.bytes.is_empty() && !pending.closed {
                // Nothing to write: sleep until the next line, not for a timer.
                pending.idle = true;
                pending = shared
                    .wake
                    .wait_while(pending, |p| p.bytes.is_empty() && !p.closed)
                    .unwrap_or_else(PoisonError::into_inner);
                pending.idle = false;
                // Woken by a line: give the lines after it the usual time to join it.
                pending.woken = false;
            }
            let (pending, _) = shared
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| {
                    p.bytes.len() < WAKE_AT && !p.closed
                })
                .unwrap_or_else(PoisonError::into_inner);
            pending.closed
        };
        let dropped = shared.drain_to(&mut stderr.lock(), &mut spare);
        if dropped > 0 {
            // Through the buffer like any line (this thread holds no lock here).
            tracing::warn!(
                dropped,
                "log lines were dropped: stderr did not take them for a while"
            );
        }
        if closed {
            shared.lock().finished = true;
            shared.done.notify_all();
            return;
        }
    }
}

/// Gives this thread the lowest normal priority (nice 19, Linux): it still runs within a few
/// milliseconds on a busy core, but a flush rarely delays a request (measured through Envoy: the
/// decision line's flushes were most of stepgate's p99 at 1000 req/s). `SCHED_IDLE` was tried
/// and starves the writer whenever other processes keep the core busy.
pub(super) fn lowest_priority() {
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
    /// Writes everything logged so far (e.g. before printing an error straight to stderr), if
    /// the writer thread is done or stderr takes it.
    pub fn flush(&self) {
        self.shared
            .drain_to(&mut io::stderr().lock(), &mut Vec::new());
    }
}

impl Drop for LogGuard {
    /// Stops the writer thread after it wrote what is pending; waits for it at most
    /// [`EXIT_WAIT`]: a stderr nobody reads must not keep the process from ending.
    fn drop(&mut self) {
        let mut pending = self.shared.lock();
        pending.closed = true;
        self.shared.wake.notify_one();
        let (pending, _) = self
            .shared
            .done
            .wait_timeout_while(pending, EXIT_WAIT, |p| !p.finished)
            .unwrap_or_else(PoisonError::into_inner);
        let finished = pending.finished;
        drop(pending);
        if let (true, Some(thread)) = (finished, self.thread.take()) {
            let _ = thread.join();
            self.flush();
        }
    }
}

/// One log line being written: appended to the shared buffer.
pub struct LineWriter<'a> {
    shared: &'a Shared,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let closed = self.shared.lock().closed;
        if closed {
            // The process is ending and the writer thread stops: what is still logged goes
            // straight to stderr.
            return io::stderr().lock().write(buf);
        }
        self.shared.append(buf);
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

    fn writer() -> (Arc<Shared>, BufferedStderr) {
        let shared = Arc::new(Shared::default());
        let writer = BufferedStderr {
            shared: Arc::clone(&shared),
        };
        (shared, writer)
    }

    #[test]
    fn lines_wait_in_the_buffer_in_order() {
        let (shared, writer) = writer();
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
        let (shared, writer) = writer();
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
    fn past_the_capacity_lines_are_dropped_and_counted_not_written_here() {
        let (shared, writer) = writer();
        let line = vec![b'x'; 1000];
        let before = crate::telemetry::metrics::global().log_lines_dropped();
        // Nothing drains: the buffer fills, then lines are dropped, and no call blocks.
        for _ in 0..2 * CAPACITY / line.len() {
            writer.make_writer().write_all(&line).unwrap();
        }
        let kept = shared.lock().bytes.len();
        assert!(kept <= CAPACITY && kept > CAPACITY - line.len(), "{kept}");
        let dropped = shared.lock().dropped;
        assert_eq!(
            dropped as usize,
            2 * CAPACITY / line.len() - CAPACITY / line.len()
        );
        assert!(crate::telemetry::metrics::global().log_lines_dropped() >= before + dropped);
        // The writer learns how many went missing once, when it next drains.
        assert_eq!(shared.drain_to(&mut Vec::new(), &mut Vec::new()), dropped);
        assert_eq!(shared.drain_to(&mut Vec::new(), &mut Vec::new()), 0);
    }

    /// Polls `holds` on the pending state for up to 5 s.
    fn eventually(shared: &Shared, holds: impl Fn(&Pending) -> bool) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            if holds(&shared.lock()) {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn with_nothing_to_write_the_thread_sleeps_until_a_line_arrives() {
        let (writer, guard) = BufferedStderr::start();
        let shared = &writer.shared;
        assert!(
            eventually(shared, |p| p.idle),
            "with nothing pending the writer sleeps without a timer"
        );
        writer
            .make_writer()
            .write_all(b"log writer test: one line after idling\n")
            .unwrap();
        assert!(
            eventually(shared, |p| p.bytes.is_empty() && p.idle),
            "the line woke the writer, was written, and the writer sleeps again"
        );
        drop(guard);
        assert!(shared.lock().finished, "an idle writer still stops");
    }

    #[test]
    fn the_guard_flushes_and_stops_the_thread() {
        let (writer, guard) = BufferedStderr::start();
        writer.make_writer().write_all(b"").unwrap();
        assert!(guard.thread.is_some(), "the writer thread started");
        drop(guard);
        assert!(writer.shared.lock().closed, "closed after the guard");
        assert!(writer.shared.lock().finished, "the thread ended");
        assert!(pending(&writer).is_empty(), "nothing left behind");
    }
}
