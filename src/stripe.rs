//! Which stripe of a per-thread structure the current thread uses: threads are numbered in the
//! order they first ask, so the first `n` threads (the workers) each get a stripe of their own
//! in a structure of `n` stripes, and no cache line is written by two cores for one request.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// This thread's stripe among `stripes` (round robin over the threads, in the order they first
/// asked).
pub fn of(stripes: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed);
    }
    INDEX.with(|i| *i) % stripes.max(1)
}
