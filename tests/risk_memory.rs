//! Hostile input against the risk counters: a million distinct keys (source networks, long
//! subjects) fed to one signal's table stay within `max_keys` and within the memory bound
//! `docs/risk.md` documents per key. Memory is what this process's allocator holds, counted by a
//! wrapping global allocator (a measurement, not a timing: the same on any machine).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering::Relaxed},
};

use stepgate::risk::counters::{Counting, MAX_DISTINCT, MAX_KEY_BYTES, Table};

struct Counted;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only the sizes are counted.
unsafe impl GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counted = Counted;

/// The bounds `docs/risk.md` states: bytes per key held, keys of at most [`MAX_KEY_BYTES`].
const EVENT_BYTES_PER_KEY: usize = 300;
const DISTINCT_BYTES_PER_KEY: usize = 1000;

const MAX_KEYS: usize = 100_000;
const FLOOD: usize = 1_000_000;

/// Feeds `fed` distinct keys of the longest length kept as is to a table of `max_keys`;
/// returns (keys held, bytes).
fn flood(counting: Counting, max_keys: usize, fed: usize) -> (usize, usize) {
    // One measurement at a time: `cargo test` runs this file's tests on parallel threads, and the
    // allocator's count is the whole process's.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let before = LIVE.load(Relaxed);
    let table = Table::new(counting, 600_000, max_keys);
    let now = 1_800_000_000_000;
    let mut key = String::with_capacity(MAX_KEY_BYTES);
    for i in 0..fed {
        key.clear();
        key.push_str(&format!("{i:016x}"));
        while key.len() < MAX_KEY_BYTES {
            key.push('s');
        }
        match counting {
            Counting::Events => table.record(&key, None, now),
            // Every key seen from as many sources as a distinct count remembers.
            Counting::Distinct => {
                let mut change = None;
                for source in 0..MAX_DISTINCT {
                    change = Some(table.record(&key, Some(&format!("10.0.0.{source}")), now));
                }
                change.unwrap()
            }
        };
    }
    let used = (LIVE.load(Relaxed) - before) as usize;
    let held = table.len();
    assert!(
        held <= table.capacity(),
        "{held} keys > {}",
        table.capacity()
    );
    drop(table);
    (held, used)
}

#[test]
fn a_million_distinct_keys_stay_within_max_keys_and_the_documented_bytes() {
    let (held, used) = flood(Counting::Events, MAX_KEYS, FLOOD);
    let bound = MAX_KEYS.div_ceil(64) * 64 * EVENT_BYTES_PER_KEY;
    eprintln!(
        "event counts: {FLOOD} keys fed, {held} held, {used} bytes ({} per key)",
        used / held
    );
    assert!(
        held >= MAX_KEYS * 9 / 10,
        "the table should be nearly full: {held}"
    );
    assert!(used <= bound, "{used} bytes > the documented {bound}");
}

#[test]
fn distinct_counts_stay_within_their_documented_bytes() {
    // Fewer keys: each is fed from 32 sources, and the bound per key is what is measured.
    let max_keys = MAX_KEYS / 5;
    let (held, used) = flood(Counting::Distinct, max_keys, max_keys * 3 / 2);
    let bound = max_keys.div_ceil(64) * 64 * DISTINCT_BYTES_PER_KEY;
    eprintln!(
        "distinct counts: {held} keys held, {used} bytes ({} per key)",
        used / held
    );
    assert!(used <= bound, "{used} bytes > the documented {bound}");
}
