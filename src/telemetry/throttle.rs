//! Warnings a caller can trigger as fast as it can send (a refused connection, a refused call, a
//! failed handshake) are logged at most once per period; the others are counted, and the next
//! warning says how many went unlogged. Every one of them is also counted in a metric.

use std::{
    sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The period of the warnings a caller can trigger: one logged per period, the rest counted.
pub const WARNING_PERIOD: Duration = Duration::from_secs(10);

/// Lets one event per period through; usable as a `static`. Nothing is kept per caller.
#[derive(Debug)]
pub struct Throttle {
    every_ms: i64,
    /// When the next event may be let through (Unix milliseconds).
    next_ms: AtomicI64,
    /// Events held back since the last one let through.
    held: AtomicU64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every_ms: every.as_millis() as i64,
            next_ms: AtomicI64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// Whether an event now is let through (to be logged): then how many were held back since
    /// the last one.
    pub fn admit(&self) -> Option<u64> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.admit_at(now_ms)
    }

    /// [`Throttle::admit`] at `now_ms` (Unix milliseconds).
    pub fn admit_at(&self, now_ms: i64) -> Option<u64> {
        let next = self.next_ms.load(Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(next, now_ms + self.every_ms, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.held.swap(0, Relaxed))
        } else {
            self.held.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_period_is_let_through_saying_how_many_were_held() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t = 1_796_000_000_000;
        assert_eq!(throttle.admit_at(t), Some(0));
        assert_eq!(throttle.admit_at(t + 1), None);
        assert_eq!(throttle.admit_at(t + 9_999), None);
        assert_eq!(throttle.admit_at(t + 10_000), Some(2));
        assert_eq!(throttle.admit_at(t + 10_005), None);
        assert_eq!(throttle.admit_at(t + 30_000), Some(1));
        // Whatever the clock says, the first event goes through.
        assert_eq!(Throttle::new(Duration::from_secs(1)).admit(), Some(0));
    }
}
