//! Counters over sliding windows, one table per risk signal, bounded in keys and memory.
//!
//! A count is the classic two-window estimate: the events of the current fixed window plus
//! those of the previous one weighted by how much of it the sliding window still covers,
//! rounded up. An event therefore counts fully for one window and fades out over the next; two
//! windows after the last event the count is zero. It needs three integers per key, where an
//! exact count would keep every event.
//!
//! A distinct count (`sources`) keeps the hashes of the last few distinct values seen (at most
//! [`MAX_DISTINCT`]) with when each was seen, and counts those inside the window.
//!
//! Keys are whatever callers send (source addresses, subjects), so the table is bounded: at
//! most `max_keys` keys, spread over shards by a keyed hash. A shard that is full first drops its
//! keys whose counts have fallen to zero, then the key with the lowest count among a sample: a
//! flood of one-off keys evicts itself, not the keys close to their threshold. A key longer than
//! [`MAX_KEY_BYTES`] is kept as its SHA-256. Memory per key is documented in `docs/risk.md` and
//! measured by `tests/risk_memory.rs`.

use std::{
    borrow::Cow,
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

/// Distinct values remembered per key (a `sources` signal's threshold is at most this).
pub const MAX_DISTINCT: usize = 32;
/// Longest key kept as it is; longer ones are kept as `sha256:<hex>`.
pub const MAX_KEY_BYTES: usize = 128;

const SHARDS: usize = 64;
/// Entries compared when a full shard must evict one that still counts.
const EVICTION_SAMPLE: usize = 16;

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Box<str>, Entry>,
    /// When the shard was last swept of zero counts (ms): at most once per [`SWEEP_EVERY_MS`],
    /// so that a flood of new keys pays a sample per key, not a scan of the shard.
    swept_ms: i64,
}

const SWEEP_EVERY_MS: i64 = 1000;

/// What a table counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Events.
    Events,
    /// Distinct values (their hashes).
    Distinct,
}

#[derive(Debug, Default, Clone)]
struct Entry {
    /// Index of the fixed window `cur` counts (`now_ms / window_ms`).
    idx: i64,
    cur: u32,
    prev: u32,
    /// A distinct count's values (boxed: an event count's entry stays 24 bytes).
    distinct: Option<Box<Distinct>>,
}

#[derive(Debug, Default, Clone)]
struct Distinct {
    /// (hash, last seen, ms), newest last.
    seen: Vec<(u64, i64)>,
    /// The shared store's count (distinct values), and when it was read (ms).
    remote: Option<(u32, i64)>,
}

/// A count's change by one event: the count before and after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub before: u64,
    pub after: u64,
}

impl Change {
    /// Whether this event brought the count to `threshold`.
    pub fn crossed(self, threshold: u64) -> bool {
        self.before < threshold && self.after >= threshold
    }
}

/// One signal's counters.
#[derive(Debug)]
pub struct Table {
    counting: Counting,
    window_ms: i64,
    per_shard: usize,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
    len: AtomicUsize,
}

impl Table {
    /// A table of at most `max_keys` keys (rounded up to a multiple of the shard count).
    pub fn new(counting: Counting, window_ms: u64, max_keys: usize) -> Self {
        Self {
            counting,
            window_ms: window_ms.max(1) as i64,
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            len: AtomicUsize::new(0),
        }
    }

    pub fn counting(&self) -> Counting {
        self.counting
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Keys held (some may have counted down to zero and wait to be dropped).
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most keys held at once.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }

    /// The fixed window `now_ms` falls in.
    pub fn window_index(&self, now_ms: i64) -> i64 {
        now_ms.div_euclid(self.window_ms)
    }

    /// The count of `key` at `now_ms`.
    pub fn count(&self, key: &str, now_ms: i64) -> u64 {
        let key = bounded(key);
        let shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        shard
            .map
            .get(key.as_ref())
            .map_or(0, |e| self.estimate(e, now_ms))
    }

    /// Counts one event for `key` (for a distinct count, the value `distinct`).
    pub fn record(&self, key: &str, distinct: Option<&str>, now_ms: i64) -> Change {
        let key = bounded(key);
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        let entry = self.entry(&mut shard, key, now_ms);
        let before = self.estimate(entry, now_ms);
        match self.counting {
            Counting::Events => {
                self.advance(entry, now_ms);
                entry.cur = entry.cur.saturating_add(1);
            }
            Counting::Distinct => {
                let hash = self.value_hash(distinct.unwrap_or_default());
                let distinct = entry.distinct.get_or_insert_default();
                distinct.seen.retain(|(h, _)| *h != hash);
                if distinct.seen.len() >= MAX_DISTINCT {
                    distinct.seen.remove(0);
                }
                distinct.seen.push((hash, now_ms));
            }
        }
        Change {
            before,
            after: self.estimate(entry, now_ms),
        }
    }

    /// Takes in what the shared store counted for `key` (every replica's events): the current
    /// and previous windows of an event count at window `idx`, or a distinct count. A count only
    /// grows this way; the windows still move on by the clock. Returns the change.
    pub fn merge_remote(&self, key: &str, idx: i64, cur: u32, prev: u32, now_ms: i64) -> Change {
        let key = bounded(key);
        let mut shard = self.shard(&key).lock().unwrap_or_else(|p| p.into_inner());
        let entry = self.entry(&mut shard, key, now_ms);
        let before = self.estimate(entry, now_ms);
        match self.counting {
            Counting::Events => {
                self.advance(entry, now_ms);
                if entry.idx == idx {
                    entry.cur = entry.cur.max(cur);
                    entry.prev = entry.prev.max(prev);
                } else if entry.idx == idx + 1 {
                    entry.prev = entry.prev.max(cur);
                }
            }
            Counting::Distinct => {
                let distinct = entry.distinct.get_or_insert_default();
                let kept = distinct
                    .remote
                    .filter(|(_, at)| *at > now_ms - self.window_ms);
                distinct.remote = Some((cur.max(kept.map_or(0, |(n, _)| n)), now_ms));
            }
        }
        Change {
            before,
            after: self.estimate(entry, now_ms),
        }
    }

    /// The count a store's windows (`cur` in window `idx`, `prev` before it) make at `now_ms`:
    /// the same estimate as this table's own.
    pub fn estimate_of(&self, idx: i64, cur: u32, prev: u32, now_ms: i64) -> u64 {
        let entry = Entry {
            idx,
            cur,
            prev,
            distinct: (self.counting == Counting::Distinct).then(|| {
                Box::new(Distinct {
                    seen: Vec::new(),
                    remote: Some((cur, now_ms)),
                })
            }),
        };
        self.estimate(&entry, now_ms)
    }

    /// The keys and their counts, highest first (for the admin API and tests), at most `limit`.
    pub fn top(&self, now_ms: i64, limit: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.extend(
                shard
                    .map
                    .iter()
                    .map(|(k, e)| (k.to_string(), self.estimate(e, now_ms)))
                    .filter(|(_, n)| *n > 0),
            );
        }
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(limit);
        all
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn value_hash(&self, value: &str) -> u64 {
        self.hasher.hash_one(value)
    }

    /// Moves `entry`'s windows on to the one `now_ms` is in.
    fn advance(&self, entry: &mut Entry, now_ms: i64) {
        let idx = self.window_index(now_ms);
        if entry.idx == idx {
            return;
        }
        entry.prev = if entry.idx == idx - 1 { entry.cur } else { 0 };
        entry.cur = 0;
        entry.idx = idx;
    }

    fn estimate(&self, entry: &Entry, now_ms: i64) -> u64 {
        match self.counting {
            Counting::Events => {
                let idx = self.window_index(now_ms);
                let (cur, prev) = if entry.idx == idx {
                    (entry.cur, entry.prev)
                } else if entry.idx == idx - 1 {
                    (0, entry.cur)
                } else {
                    (0, 0)
                };
                let left = self.window_ms - now_ms.rem_euclid(self.window_ms);
                // Rounded up: an event counts until the window has slid wholly past it.
                let weighted = (u64::from(prev) * left as u64).div_ceil(self.window_ms as u64);
                u64::from(cur) + weighted
            }
            Counting::Distinct => {
                let since = now_ms - self.window_ms;
                let Some(distinct) = &entry.distinct else {
                    return 0;
                };
                let local = distinct.seen.iter().filter(|(_, at)| *at > since).count() as u64;
                let remote = distinct
                    .remote
                    .filter(|(_, at)| *at > since)
                    .map_or(0, |(n, _)| u64::from(n));
                local.max(remote)
            }
        }
    }

    /// `key`'s entry in `shard`, made (with room made for it) if new.
    fn entry<'s>(&self, shard: &'s mut Shard, key: Cow<'_, str>, now_ms: i64) -> &'s mut Entry {
        if !shard.map.contains_key(key.as_ref()) && shard.map.len() >= self.per_shard {
            self.make_room(shard, now_ms);
        }
        shard
            .map
            .entry(key.into_owned().into_boxed_str())
            .or_insert_with(|| {
                self.len.fetch_add(1, Relaxed);
                Entry::default()
            })
    }

    /// Drops the shard's keys that count zero (at most once a second); if that frees nothing,
    /// the key with the lowest count of a sample.
    fn make_room(&self, shard: &mut Shard, now_ms: i64) {
        let before = shard.map.len();
        if now_ms - shard.swept_ms >= SWEEP_EVERY_MS {
            shard.swept_ms = now_ms;
            shard.map.retain(|_, e| self.estimate(e, now_ms) > 0);
        }
        if shard.map.len() == before {
            let victim = shard
                .map
                .iter()
                .take(EVICTION_SAMPLE)
                .min_by_key(|(_, e)| self.estimate(e, now_ms))
                .map(|(k, _)| k.clone());
            if let Some(victim) = victim {
                shard.map.remove(&victim);
            }
        }
        self.len.fetch_sub(before - shard.map.len(), Relaxed);
    }
}

/// `key`, or its SHA-256 when it is longer than [`MAX_KEY_BYTES`].
pub fn bounded(key: &str) -> Cow<'_, str> {
    if key.len() <= MAX_KEY_BYTES {
        return Cow::Borrowed(key);
    }
    let hex = crate::identity::sha256_hex(key, 64);
    Cow::Owned(format!("sha256:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: i64 = 10_000;

    #[test]
    fn an_event_counts_for_one_window_then_fades_over_the_next() {
        let t = Table::new(Counting::Events, W as u64, 1000);
        let start = 100 * W;
        for i in 0..4 {
            let change = t.record("alice", None, start + i);
            assert_eq!(change.after, i as u64 + 1);
        }
        assert!(t.record("alice", None, start + 5).crossed(5));
        assert_eq!(t.count("alice", start + W - 1), 5);
        // Half-way through the next window, half of them still count (rounded up).
        assert_eq!(t.count("alice", start + W + W / 2), 3);
        assert_eq!(t.count("alice", start + 2 * W - 1), 1);
        assert_eq!(t.count("alice", start + 2 * W), 0);
        assert_eq!(t.count("bob", start), 0);
    }

    #[test]
    fn distinct_values_are_counted_once_within_the_window() {
        let t = Table::new(Counting::Distinct, W as u64, 1000);
        for (i, source) in ["10.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"]
            .iter()
            .enumerate()
        {
            t.record("fp", Some(source), i as i64);
        }
        assert_eq!(t.count("fp", 10), 3);
        // 10.0.0.1 was seen again at 2: still inside the window when the other two are not.
        assert_eq!(t.count("fp", W + 1), 2);
        assert_eq!(t.count("fp", W + 2), 1);
        assert_eq!(t.count("fp", W + 3), 0);
    }

    #[test]
    fn remote_counts_raise_the_local_view() {
        let t = Table::new(Counting::Events, W as u64, 1000);
        let now = 7 * W + 1;
        t.record("k", None, now);
        let change = t.merge_remote("k", 7, 6, 0, now);
        assert_eq!((change.before, change.after), (1, 6));
        // An older reply does not lower it.
        t.merge_remote("k", 7, 2, 0, now);
        assert_eq!(t.count("k", now), 6);
        let d = Table::new(Counting::Distinct, W as u64, 1000);
        d.merge_remote("fp", 0, 4, 0, now);
        assert_eq!(d.count("fp", now + W - 1), 4);
        assert_eq!(d.count("fp", now + W), 0);
    }

    #[test]
    fn a_flood_of_keys_stays_within_the_bound_and_keeps_the_counted_ones() {
        let t = Table::new(Counting::Events, W as u64, 6400);
        let now = 3 * W;
        for _ in 0..5 {
            t.record("attacker-of-note", None, now);
        }
        for i in 0..100_000 {
            t.record(
                &format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                None,
                now,
            );
        }
        assert!(t.len() <= t.capacity(), "{} > {}", t.len(), t.capacity());
        assert_eq!(t.capacity(), 6400);
        assert_eq!(t.count("attacker-of-note", now), 5);
        // Once their window is over, the flood's keys make room at once.
        t.record("later", None, now + 3 * W);
        assert_eq!(t.count("later", now + 3 * W), 1);
    }

    proptest::proptest! {
        /// Against the exact events: the estimate counts at least the current fixed window's
        /// events, at most those of the last two windows, and 0 two windows after the last one;
        /// a threshold is crossed by exactly one event while the count only grows.
        #[test]
        fn the_estimate_is_bounded_by_the_exact_events(
            gaps in proptest::collection::vec(0i64..3_000, 1..60),
            probe in 0i64..25_000,
        ) {
            let t = Table::new(Counting::Events, W as u64, 100);
            let mut at = 50 * W;
            let mut events = Vec::new();
            for gap in gaps {
                at += gap;
                t.record("k", None, at);
                events.push(at);
            }
            let now = at + probe;
            let window_start = now - now.rem_euclid(W);
            let in_current = events.iter().filter(|e| **e >= window_start).count() as u64;
            let in_two = events.iter().filter(|e| **e >= window_start - W).count() as u64;
            let count = t.count("k", now);
            proptest::prop_assert!(in_current <= count && count <= in_two, "{in_current} <= {count} <= {in_two}");
            if now >= events.last().unwrap() + 2 * W {
                proptest::prop_assert_eq!(count, 0);
            }
        }
    }

    #[test]
    fn long_keys_are_kept_as_their_digest() {
        let t = Table::new(Counting::Events, W as u64, 100);
        let long = "s".repeat(10_000);
        t.record(&long, None, 0);
        assert_eq!(t.count(&long, 0), 1);
        let top = t.top(0, 10);
        assert!(
            top[0].0.starts_with("sha256:") && top[0].0.len() == 71,
            "{top:?}"
        );
    }
}
