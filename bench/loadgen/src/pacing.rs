//! The open-loop schedule: request `k` is due at `start + k / rate`, evenly spaced (never in bursts),
//! whatever happened to the requests before it. Latency is measured from this intended send time, so
//! a server stall shows up in the latency of every request that should have been sent during it
//! (no coordinated omission).

use std::time::{Duration, Instant};

/// Evenly spaced send times at a fixed rate.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    /// Nanoseconds between two sends, as a float so that rates which do not divide a second
    /// evenly do not drift.
    interval_ns: f64,
}

impl Schedule {
    /// `rate` requests per second from `start`. Panics on a rate that is not positive and finite.
    pub fn new(start: Instant, rate: f64) -> Self {
        assert!(
            rate.is_finite() && rate > 0.0,
            "the rate must be positive, got {rate}"
        );
        Self {
            start,
            interval_ns: 1e9 / rate,
        }
    }

    /// When request `k` (counting from 0) is due.
    pub fn intended(&self, k: u64) -> Instant {
        self.start + self.offset(k)
    }

    /// `intended(k) - start`.
    pub fn offset(&self, k: u64) -> Duration {
        Duration::from_nanos((k as f64 * self.interval_ns).round() as u64)
    }

    /// How many requests are due in `[start, start + elapsed)` — the number a generator that kept
    /// up has sent by then.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        let n = elapsed.as_nanos() as f64 / self.interval_ns;
        // Request k is due at offset k·interval; those with k·interval < elapsed are due.
        let whole = n.ceil() as u64;
        // Guard against float rounding at exact multiples.
        if whole > 0 && self.offset(whole - 1) >= elapsed {
            whole - 1
        } else {
            whole
        }
    }

    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns.round() as u64)
    }
}

/// What the dispatcher should do before sending the request due at `due`, at time `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// It is due (or late): send now.
    Send,
    /// Far enough away for the runtime's (millisecond) timer: sleep until this instant, which is
    /// a little before `due`, and look again.
    Sleep(Instant),
    /// Too close for the timer: yield to the runtime (which processes responses) and look again.
    Spin,
}

/// The timer wheel of tokio has millisecond resolution: sleeping up to `due` could wake up to a
/// millisecond late and then fire a burst. So sleep only until `SLEEP_MARGIN` before `due`, then
/// spin (yielding) to send on time.
pub const SLEEP_MARGIN: Duration = Duration::from_micros(1500);

pub fn wait_for(due: Instant, now: Instant) -> Wait {
    if due <= now {
        Wait::Send
    } else if due - now > SLEEP_MARGIN + Duration::from_millis(1) {
        Wait::Sleep(due - SLEEP_MARGIN)
    } else {
        Wait::Spin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_are_evenly_spaced_without_drift() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 3.0);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(s.offset(2), Duration::from_nanos(666_666_667));
        // After a million requests at 3/s the schedule is still exact (no accumulated rounding).
        assert_eq!(s.offset(3_000_000), Duration::from_secs(1_000_000));
        let fast = Schedule::new(t0, 20_000.0);
        for k in 0..1000 {
            assert_eq!(
                fast.offset(k + 1) - fast.offset(k),
                Duration::from_micros(50)
            );
        }
    }

    #[test]
    fn due_by_counts_requests_whose_time_has_come() {
        let s = Schedule::new(Instant::now(), 1000.0);
        assert_eq!(s.due_by(Duration::ZERO), 0);
        assert_eq!(s.due_by(Duration::from_nanos(1)), 1); // request 0 at offset 0
        assert_eq!(s.due_by(Duration::from_millis(1)), 1); // request 1 is due exactly then
        assert_eq!(s.due_by(Duration::from_micros(1001)), 2);
        assert_eq!(s.due_by(Duration::from_secs(10)), 10_000);
        let odd = Schedule::new(Instant::now(), 3.0);
        assert_eq!(odd.due_by(Duration::from_secs(1)), 3);
        assert_eq!(odd.due_by(Duration::from_millis(1001)), 4);
    }

    #[test]
    fn the_dispatcher_sleeps_far_spins_near_and_sends_when_due() {
        let now = Instant::now();
        assert_eq!(wait_for(now, now), Wait::Send);
        assert_eq!(wait_for(now, now + Duration::from_millis(3)), Wait::Send);
        assert_eq!(wait_for(now + Duration::from_micros(200), now), Wait::Spin);
        let due = now + Duration::from_millis(10);
        assert_eq!(wait_for(due, now), Wait::Sleep(due - SLEEP_MARGIN));
    }

    #[test]
    #[should_panic(expected = "the rate must be positive")]
    fn a_zero_rate_is_refused() {
        let _ = Schedule::new(Instant::now(), 0.0);
    }
}
