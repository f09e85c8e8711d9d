//! How far the reader falls behind the kernel, for the summary.

use hdrhistogram::Histogram;

use super::BATCH;
use crate::render::Summary;

/// How far the reader falls behind the kernel, measured at the cost of a clock read per drain
/// pass (none per record): the delay of each pass's oldest record, and the largest catch-up.
pub(super) struct Lag {
    /// Per drain pass that handled records: CLOCK_MONOTONIC at its start minus the oldest
    /// `ts_ns` it handled, i.e. how long that record waited before the correlator got it.
    delays: Histogram<u64>,
    delay_max_ns: u64,
    /// The oldest `ts_ns` handled in the pass under way (`u64::MAX` before the first).
    oldest_ns: u64,
    /// The catch-up under way, if the last pass returned a full batch: records handled so
    /// far, and when its first pass started.
    catching_up: Option<(u64, u64)>,
    /// The largest catch-up so far: records, and ns from the start of its first pass to the
    /// end of its last.
    largest: (u64, u64),
}

impl Lag {
    /// Delays are tracked from 1 us to an hour (longer ones count at an hour; the max stays
    /// exact), to two significant digits.
    const HIGHEST_NS: u64 = 3_600_000_000_000;

    pub(super) fn new() -> Self {
        Self {
            // The bounds are constants that `new_with_bounds` accepts.
            delays: Histogram::new_with_bounds(1_000, Self::HIGHEST_NS, 2)
                .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!())),
            delay_max_ns: 0,
            oldest_ns: u64::MAX,
            catching_up: None,
            largest: (0, 0),
        }
    }

    /// A record of the pass under way, stamped `ts_ns` in the kernel.
    pub(super) fn saw(&mut self, ts_ns: u64) {
        self.oldest_ns = self.oldest_ns.min(ts_ns);
    }

    /// A pass that started at `started_ns` handed `drained` records (at most [`BATCH`]); `now`
    /// reads the clock, only when a catch-up ends.
    pub(super) fn pass(&mut self, started_ns: u64, drained: usize, now: impl FnOnce() -> u64) {
        if drained > 0 {
            // A record stamped after the pass started (it raced the drain) waited no time.
            let delay = started_ns.saturating_sub(self.oldest_ns);
            self.oldest_ns = u64::MAX;
            self.delays.saturating_record(delay.max(1));
            self.delay_max_ns = self.delay_max_ns.max(delay);
        }
        let drained = drained as u64;
        if drained == BATCH as u64 {
            self.catching_up.get_or_insert((0, started_ns)).0 += drained;
        } else if let Some((events, first_ns)) = self.catching_up.take() {
            let events = events + drained;
            if events > self.largest.0 {
                self.largest = (events, now().saturating_sub(first_ns));
            }
        }
    }

    pub(super) fn fill(&self, summary: &mut Summary) {
        if !self.delays.is_empty() {
            // Two significant digits: a percentile may round up past the exact max.
            summary.delay_p50_ns = self.delays.value_at_quantile(0.5).min(self.delay_max_ns);
            summary.delay_p99_ns = self.delays.value_at_quantile(0.99).min(self.delay_max_ns);
        }
        summary.delay_max_ns = self.delay_max_ns;
        // A catch-up that the end of tracing cut short has no end to time: not counted.
        (
            summary.largest_backlog_events,
            summary.largest_backlog_drain_ns,
        ) = self.largest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A pass at `start` of `records` stamped `ts`, ending at `end`.
    fn pass(lag: &mut Lag, start: u64, ts: &[u64], drained: usize, end: u64) {
        for &t in ts {
            lag.saw(t);
        }
        lag.pass(start, drained, || end);
    }

    #[test]
    fn delay_is_the_oldest_record_of_each_pass() {
        let mut lag = Lag::new();
        // Out of order across CPUs: the oldest counts.
        pass(
            &mut lag,
            100 * MS,
            &[95 * MS, 90 * MS, 99 * MS],
            3,
            100 * MS,
        );
        // Empty passes record nothing.
        pass(&mut lag, 150 * MS, &[], 0, 150 * MS);
        pass(&mut lag, 200 * MS, &[199 * MS], 1, 200 * MS);
        // Stamped after the pass started: no delay.
        pass(&mut lag, 300 * MS, &[301 * MS], 1, 301 * MS);
        let mut summary = Summary::default();
        lag.fill(&mut summary);
        assert_eq!(summary.delay_max_ns, 10 * MS);
        assert!(summary.delay_p50_ns.abs_diff(MS) <= MS / 50, "{summary:?}");
        assert_eq!(summary.delay_p99_ns, 10 * MS);
        assert_eq!(summary.largest_backlog_events, 0);
        assert_eq!(summary.largest_backlog_drain_ns, 0);
    }

    #[test]
    fn largest_catch_up_is_kept() {
        let mut lag = Lag::new();
        // Two full passes and a short one: 2 * BATCH + 10 records from 1 s to 1.03 s.
        pass(&mut lag, 1_000 * MS, &[900 * MS], BATCH, 1_010 * MS);
        pass(&mut lag, 1_010 * MS, &[950 * MS], BATCH, 1_020 * MS);
        pass(&mut lag, 1_020 * MS, &[1_000 * MS], 10, 1_030 * MS);
        // A smaller one later does not replace it.
        pass(&mut lag, 2_000 * MS, &[1_990 * MS], BATCH, 2_001 * MS);
        pass(&mut lag, 2_001 * MS, &[], 0, 2_002 * MS);
        let mut summary = Summary::default();
        lag.fill(&mut summary);
        assert_eq!(summary.largest_backlog_events, 2 * BATCH as u64 + 10);
        assert_eq!(summary.largest_backlog_drain_ns, 30 * MS);
        assert_eq!(summary.delay_max_ns, 100 * MS);
        // A single short pass is no catch-up.
        let mut lag = Lag::new();
        pass(&mut lag, MS, &[0], BATCH - 1, 2 * MS);
        let mut summary = Summary::default();
        lag.fill(&mut summary);
        assert_eq!(summary.largest_backlog_events, 0);
    }
}
