//! Shared copies of the claim values many tokens repeat.
//!
//! Across a cache of 100 000 tokens, `iss`, the tenant, the client, `acr`, `amr`, the scope and
//! role lists take a handful of distinct values; only the subject is really per token. Interning
//! them keeps one copy of each (cloning is a reference count) and leaves a cached token at a few
//! hundred bytes. Bounded: a value longer than [`MAX_SHARED_LEN`] bytes is never shared (values
//! that long are rarely repeated), and past [`MAX_VALUES`] distinct values or [`STRIPE_BYTES`]
//! bytes a stripe shares no new ones, so a stream of tokens with unique values cannot grow the
//! tables without limit. What the tables hold outlives the tokens that brought it, and the token
//! cache does not count it (`cache::entry_bytes`): these bounds are what keep it small, at most
//! [`STRIPES`] × [`STRIPE_BYTES`] in all.
//!
//! The tables are striped per thread ([`STRIPES`]), so that verifications on several cores do
//! not queue for one lock: each stripe shares the values its threads have seen, at most
//! [`MAX_VALUES`] of each kind.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use foldhash::fast::RandomState;

/// Distinct strings (and, separately, lists) kept shared, per stripe.
pub const MAX_VALUES: usize = 4096;

/// Stripes of the tables (threads past this many share them).
pub const STRIPES: usize = 16;

/// The longest string shared, in bytes; a list is shared only if each of its items is.
pub const MAX_SHARED_LEN: usize = 256;

/// What the values one stripe shares may take together, estimated as [`Tables`] counts it.
pub const STRIPE_BYTES: usize = 256 * 1024;

const _: () = assert!(
    STRIPES * STRIPE_BYTES == 4 << 20,
    "docs/limits.md and cache::entry_bytes say the interner holds at most 4 MiB"
);

/// The allocation of a shared value beyond its content: an `Arc`'s two counts, and the table's
/// slot for it (a fat pointer).
const OVERHEAD: usize = 4 * size_of::<usize>();

#[derive(Debug)]
pub struct Interner {
    tables: Box<[Mutex<Tables>]>,
}

impl Default for Interner {
    fn default() -> Self {
        Self {
            tables: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }
}

/// The shared values, locked once for all the values of a token.
#[derive(Debug, Default)]
pub struct Tables {
    strings: HashSet<Arc<str>, RandomState>,
    lists: HashSet<Arc<[Arc<str>]>, RandomState>,
    /// What the shared values take, estimated: their content and [`OVERHEAD`] each.
    bytes: usize,
}

impl Interner {
    /// This thread's stripe of the tables, locked.
    pub fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables[crate::stripe::of(STRIPES)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Tables {
    /// The shared copy of `value` (made and remembered on first sight, while there is room).
    pub fn string(&mut self, value: &str) -> Arc<str> {
        if value.len() > MAX_SHARED_LEN {
            return Arc::from(value);
        }
        if let Some(shared) = self.strings.get(value) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(value);
        if self.strings.len() < MAX_VALUES && self.room_for(value.len()) {
            self.strings.insert(Arc::clone(&shared));
        }
        shared
    }

    /// The shared copy of a list, its items shared too.
    pub fn list<'a>(&mut self, values: impl IntoIterator<Item = &'a str>) -> Arc<[Arc<str>]> {
        let items: Vec<Arc<str>> = values.into_iter().map(|v| self.string(v)).collect();
        if let Some(shared) = self.lists.get(items.as_slice()) {
            return Arc::clone(shared);
        }
        // Shared only if each item is: an item of its own (too long, or the strings full) would
        // be held by the shared list without being counted.
        let all_shared = items.iter().all(|item| {
            self.strings
                .get(&**item)
                .is_some_and(|s| Arc::ptr_eq(s, item))
        });
        let shared: Arc<[Arc<str>]> = items.into();
        if all_shared
            && self.lists.len() < MAX_VALUES
            && self.room_for(shared.len() * size_of::<Arc<str>>())
        {
            self.lists.insert(Arc::clone(&shared));
        }
        shared
    }

    /// Whether a value of `len` bytes more fits the stripe's [`STRIPE_BYTES`]; if so, it is
    /// counted.
    fn room_for(&mut self, len: usize) -> bool {
        let bytes = self.bytes + len + OVERHEAD;
        let fits = bytes <= STRIPE_BYTES;
        if fits {
            self.bytes = bytes;
        }
        fits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads lock their own stripe: the values of one stripe are shared within it, and only
    /// within it. (Other tests' threads take stripe numbers too, so each thread's stripe is read
    /// rather than assumed.)
    #[test]
    fn each_thread_locks_its_own_stripe() {
        let interner = Interner::default();
        let shared = || {
            let at = Arc::as_ptr(&interner.lock().string("tenant")) as *const u8 as usize;
            (crate::stripe::of(STRIPES), at)
        };
        let here = shared();
        let elsewhere: Vec<(usize, usize)> = std::thread::scope(|scope| {
            (0..STRIPES - 1)
                .map(|_| scope.spawn(shared).join().unwrap())
                .collect()
        });
        assert_eq!(here, shared(), "one thread, one stripe");
        assert!(
            elsewhere.iter().any(|(stripe, _)| *stripe != here.0),
            "every thread on one stripe"
        );
        for (stripe, at) in elsewhere {
            assert_eq!(
                stripe == here.0,
                at == here.1,
                "stripe {stripe} against {}",
                here.0
            );
        }
    }

    #[test]
    fn equal_values_share_one_copy() {
        let interner = Interner::default();
        let mut interner = interner.lock();
        let a = interner.string("https://issuer.example");
        let b = interner.string(&String::from("https://issuer.example"));
        assert!(Arc::ptr_eq(&a, &b));
        let l1 = interner.list(["read", "write"]);
        let l2 = interner.list(vec!["read", "write"]);
        assert!(Arc::ptr_eq(&l1, &l2));
        assert!(
            Arc::ptr_eq(&l1[0], &interner.string("read")),
            "items are shared too"
        );
        assert!(
            !Arc::ptr_eq(&l1, &interner.list(["write", "read"])),
            "order matters"
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let interner = Interner::default();
        let mut interner = interner.lock();
        for i in 0..MAX_VALUES + 100 {
            assert_eq!(&*interner.string(&format!("v{i}")), format!("v{i}"));
        }
        assert_eq!(interner.strings.len(), MAX_VALUES);
        let late = format!("v{}", MAX_VALUES + 1);
        assert!(
            !Arc::ptr_eq(&interner.string(&late), &interner.string(&late)),
            "values past the bound are not shared"
        );
        interner.list([late.as_str()]);
        assert!(
            interner.lists.is_empty(),
            "a list of an item not shared is not shared: it would hold the item uncounted"
        );
    }

    #[test]
    fn long_values_are_not_shared() {
        let interner = Interner::default();
        let mut interner = interner.lock();
        let long = "g".repeat(MAX_SHARED_LEN + 1);
        let short = "g".repeat(MAX_SHARED_LEN);
        assert!(!Arc::ptr_eq(
            &interner.string(&long),
            &interner.string(&long)
        ));
        assert!(Arc::ptr_eq(
            &interner.string(&short),
            &interner.string(&short)
        ));
        assert!(
            !Arc::ptr_eq(
                &interner.list([short.as_str(), long.as_str()]),
                &interner.list([short.as_str(), long.as_str()])
            ),
            "a list with an item not shared is not shared either"
        );
        assert_eq!(interner.lists.len(), 0);
    }

    /// Values of the longest length shared fill a stripe's byte budget well before its count.
    #[test]
    fn the_table_is_bounded_in_bytes() {
        let interner = Interner::default();
        let mut interner = interner.lock();
        for i in 0..MAX_VALUES {
            let value = format!("{i:0>width$}", width = MAX_SHARED_LEN);
            assert_eq!(&*interner.string(&value), value);
        }
        let each = MAX_SHARED_LEN + OVERHEAD;
        assert_eq!(interner.strings.len(), STRIPE_BYTES / each);
        assert!(interner.bytes <= STRIPE_BYTES);
        let held: usize = interner.strings.iter().map(|s| s.len() + OVERHEAD).sum();
        assert_eq!(held, interner.bytes, "what is counted is what is held");
        let lists_before = interner.lists.len();
        interner.list(["a", "b"]);
        assert_eq!(
            interner.lists.len(),
            lists_before,
            "a full stripe shares no new list"
        );
    }
}
