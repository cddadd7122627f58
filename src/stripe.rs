//! Which stripe of a per-thread structure the current thread uses: threads are numbered in the
//! order they first ask, so the first `n` threads (the workers) each get a stripe of their own
//! in a structure of `n` stripes, and no cache line is written by two cores for one request.
//! And each thread's own copies of the policy's strings that decisions carry ([`local_copy`]).

use std::{
    cell::RefCell,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

/// This thread's stripe among `stripes` (round robin over the threads, in the order they first
/// asked).
pub fn of(stripes: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed);
    }
    INDEX.with(|i| *i) % stripes.max(1)
}

/// Slots of [`local_copy`]'s per-thread table.
const COPY_SLOTS: usize = 256;

/// This thread's own copy of `shared`, a string the policy holds that decisions carry (a rule's
/// id, an identity header's name). A clone of the policy's `Arc` writes its count, on a line every
/// core deciding under the policy writes for each of its requests; a clone of this thread's copy
/// writes a line no other core does. Copies are kept in [`COPY_SLOTS`] slots, picked by the
/// string's address; a slot also holds the policy's `Arc`, so that while it is kept the address
/// cannot become another string's. Two strings taking turns in a slot are copied each time,
/// which costs an allocation and is still correct.
pub fn local_copy(shared: &Arc<str>) -> Arc<str> {
    type Slots = Box<[Option<(Arc<str>, Arc<str>)>]>;
    thread_local! {
        static COPIES: RefCell<Slots> = RefCell::new(vec![None; COPY_SLOTS].into_boxed_slice());
    }
    let address = Arc::as_ptr(shared).cast::<u8>() as usize;
    // Allocations are 16-byte aligned; the bits above vary between small strings.
    let slot = ((address >> 4) ^ (address >> 12)) % COPY_SLOTS;
    COPIES
        .try_with(|copies| {
            let mut copies = copies.borrow_mut();
            match &copies[slot] {
                Some((held, copy)) if Arc::ptr_eq(held, shared) => Arc::clone(copy),
                _ => {
                    let copy = Arc::<str>::from(&**shared);
                    copies[slot] = Some((Arc::clone(shared), Arc::clone(&copy)));
                    copy
                }
            }
        })
        // The thread is ending (its table already dropped): the shared one will do.
        .unwrap_or_else(|_| Arc::clone(shared))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy reads as the shared string, is this thread's own allocation, is the same copy
    /// again and again, and taking it leaves the shared count alone after the first time; on
    /// another thread it is another copy.
    #[test]
    fn a_local_copy_is_the_threads_own_and_leaves_the_shared_count_alone() {
        let shared: Arc<str> = Arc::from("wire-transfer");
        let first = local_copy(&shared);
        assert_eq!(&*first, "wire-transfer");
        assert!(!Arc::ptr_eq(&first, &shared));
        let count = Arc::strong_count(&shared);
        let copies: Vec<Arc<str>> = (0..100).map(|_| local_copy(&shared)).collect();
        assert!(copies.iter().all(|c| Arc::ptr_eq(c, &first)));
        assert_eq!(Arc::strong_count(&shared), count);
        let theirs = std::thread::scope(|s| s.spawn(|| local_copy(&shared)).join().unwrap());
        assert_eq!(&*theirs, "wire-transfer");
        assert!(!Arc::ptr_eq(&theirs, &first));
    }

    /// Many strings, more than the slots: each copy still reads as its own string.
    #[test]
    fn strings_sharing_a_slot_are_each_copied_as_themselves() {
        let shared: Vec<Arc<str>> = (0..4 * COPY_SLOTS)
            .map(|i| Arc::from(format!("rule-{i}")))
            .collect();
        for round in 0..3 {
            for (i, s) in shared.iter().enumerate() {
                assert_eq!(&*local_copy(s), format!("rule-{i}"), "round {round}");
            }
        }
    }
}
