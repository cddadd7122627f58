//! Shared copies of the claim values many tokens repeat.
//!
//! Across a cache of 100 000 tokens, `iss`, the tenant, the client, `acr`, `amr`, the scope and
//! role lists take a handful of distinct values; only the subject is really per token. Interning
//! them keeps one copy of each (cloning is a reference count) and leaves a cached token at a few
//! hundred bytes. Bounded: past [`MAX_VALUES`] distinct values new ones are simply not shared, so
//! a stream of tokens with unique values cannot grow the table without limit.
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
        if let Some(shared) = self.strings.get(value) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(value);
        if self.strings.len() < MAX_VALUES {
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
        let shared: Arc<[Arc<str>]> = items.into();
        if self.lists.len() < MAX_VALUES {
            self.lists.insert(Arc::clone(&shared));
        }
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads lock their own stripe: the values of one stripe are shared within it.
    #[test]
    fn each_thread_locks_its_own_stripe() {
        let interner = Interner::default();
        let here = Arc::as_ptr(&interner.lock().string("tenant")) as *const u8 as usize;
        let elsewhere: Vec<usize> = std::thread::scope(|scope| {
            (0..STRIPES - 1)
                .map(|_| {
                    scope
                        .spawn(|| {
                            Arc::as_ptr(&interner.lock().string("tenant")) as *const u8 as usize
                        })
                        .join()
                        .unwrap()
                })
                .collect()
        });
        assert_eq!(
            here,
            Arc::as_ptr(&interner.lock().string("tenant")) as *const u8 as usize
        );
        assert!(
            elsewhere.iter().all(|p| *p != here),
            "other threads, other stripes"
        );
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
    }
}
