//! Knowing when things happened, as the kernel's event timestamps count time (CLOCK_MONOTONIC).

use std::{thread, time::Duration};

use serde_json::Value;

use crate::mono_ns;

/// A millisecond, in ns.
pub const MS: u64 = 1_000_000;
/// Polling interval while a change is due within milliseconds.
pub const SPIN: Duration = Duration::from_micros(100);
/// Polling interval while waiting for a timer (a timeout, a retransmission).
pub const POLL: Duration = Duration::from_millis(1);

/// When something happened, as far as the test can tell: between `lo` and `hi` (CLOCK_MONOTONIC).
#[derive(Clone, Copy, Debug)]
pub struct Moment {
    pub lo: u64,
    pub hi: u64,
}

impl Moment {
    /// The span of `f`: a system call whose state change happens inside it.
    pub fn of<T>(f: impl FnOnce() -> T) -> (Self, T) {
        let lo = mono_ns();
        let value = f();
        (Self { lo, hi: mono_ns() }, value)
    }

    /// The shortest and longest time from `self` to `later`.
    pub fn to(self, later: Moment) -> (u64, u64) {
        (later.lo.saturating_sub(self.hi), later.hi - self.lo)
    }
}

/// Polls `done` every `interval` until it holds. The change happened after the start of the last
/// poll that did not see it (or `since`, a moment known to come before it) and before the end of
/// the poll that did.
pub fn wait_for(
    what: &str,
    since: u64,
    timeout: Duration,
    interval: Duration,
    mut done: impl FnMut() -> bool,
) -> Moment {
    let deadline = mono_ns() + timeout.as_nanos() as u64;
    let mut lo = since;
    loop {
        let start = mono_ns();
        if done() {
            return Moment { lo, hi: mono_ns() };
        }
        assert!(start < deadline, "{what}: not within {timeout:?}");
        lo = start;
        thread::sleep(interval);
    }
}

pub fn sleep_until(t: u64) {
    let now = mono_ns();
    if t > now {
        thread::sleep(Duration::from_nanos(t - now));
    }
}

/// `ns`, the record `r`'s `what`, lies within `(lo, hi)` as the test timed it, give or take
/// `tolerance`.
pub fn assert_within(r: &Value, what: &str, ns: u64, (lo, hi): (u64, u64), tolerance: u64) {
    assert!(
        ns + tolerance >= lo && ns <= hi + tolerance,
        "{what}: {:.3} ms by the record, {:.3} to {:.3} ms by the test (give or take {:.3} ms): {r}",
        ns as f64 / 1e6,
        lo as f64 / 1e6,
        hi as f64 / 1e6,
        tolerance as f64 / 1e6
    );
}
