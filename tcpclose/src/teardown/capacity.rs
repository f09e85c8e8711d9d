//! Bounded memory: the cap on the sockets followed, the eviction of the idlest when it is
//! reached, and the memory the tables give back after a burst.

use foldhash::HashMap;

use super::{
    Correlator,
    hang::evicted,
    life::{Life, Tuple},
};
use crate::hung::SocketKey;

/// How often [`Correlator::expire`] considers giving back the memory of its tables (see
/// [`Trim`]).
pub const TRIM_PERIOD_NS: u64 = 30_000_000_000;

/// When the tables next consider giving memory back, and the most the handoffs, the unclaimed
/// timewait sockets and the pending cancels held since they last did, sampled at each
/// [`Correlator::expire`] (the dense tables keep their own).
#[derive(Debug, Default)]
pub(super) struct Trim {
    due_ns: Option<u64>,
    high: [usize; 3],
}

/// Gives back the memory of `map` if it is sparse (see [`crate::dense::sparse`]) given `high`,
/// the most it held lately: down to room for twice that.
pub(super) fn shrink_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>, high: usize) {
    if crate::dense::sparse(high, map.capacity()) {
        map.shrink_to(high.saturating_mul(2));
    }
}

impl Correlator {
    /// Gives back the memory of the tables that stayed sparse (a quarter full or less) over a
    /// whole [`TRIM_PERIOD_NS`]: down to room for twice the most they held in it. A burst (a
    /// load test, a namespace torn down with its timewait sockets) then leaves no lasting RSS,
    /// while a table that fills and drains within the period keeps its room instead of being
    /// reallocated each time. The two small transient tables are sampled at each call, which is
    /// frequent: the run loop calls [`Correlator::expire`] whenever it has caught up with the
    /// ring.
    pub(super) fn trim(&mut self, now_ns: u64) {
        let lens = [
            self.handoffs.len(),
            self.unclaimed.len(),
            self.cancelled.len(),
        ];
        for (high, len) in self.trim.high.iter_mut().zip(lens) {
            *high = (*high).max(len);
        }
        let due_ns = *self
            .trim
            .due_ns
            .get_or_insert(now_ns.saturating_add(TRIM_PERIOD_NS));
        if now_ns < due_ns {
            return;
        }
        let [handoffs, unclaimed, cancelled] = std::mem::replace(&mut self.trim.high, lens);
        self.trim.due_ns = Some(now_ns.saturating_add(TRIM_PERIOD_NS));
        self.lives.shrink_sparse();
        self.timewait.shrink_sparse();
        shrink_sparse(&mut self.handoffs, handoffs);
        shrink_sparse(&mut self.unclaimed, unclaimed);
        self.cancelled.shrink_sparse(cancelled);
    }

    /// Room in the full-socket and timewait tables.
    #[cfg(test)]
    fn capacities(&self) -> (usize, usize) {
        (self.lives.capacity(), self.timewait.capacity())
    }

    /// Keeps the tables under their cap: when full, drops the eighth of the sockets followed
    /// that has been idle longest (sockets reported hung last), whatever their table: full and
    /// timewait sockets, handoffs waiting for their timewait socket, unclaimed timewait sockets
    /// and sockets found at start-up (each of which alone may fill the table).
    /// Sockets reported hung and dropped here are reported
    /// [`AlertKind::Evicted`](crate::hung::AlertKind::Evicted) (at `now_ns`): whatever becomes of
    /// them is no longer seen, and the hung gauges must let go of them.
    pub(super) fn make_room(&mut self, now_ns: u64) {
        if self.len() < self.max_sockets {
            return;
        }
        // By last event (or handoff, or sighting at start-up), sockets reported hung last: they
        // are the idlest of all, and the very ones an operator is watching (a process leaking
        // CLOSE_WAIT sockets while the host churns through timewait sockets).
        let hung = |life: &Life| life.hung_at_ns.is_known();
        let mut idle: Vec<((bool, u64), Victim)> = Vec::with_capacity(self.len());
        idle.extend(self.lives.iter().map(|(k, l)| {
            let last = l.since_ns.get().unwrap_or(0);
            ((hung(l), last), Victim::Full(*k))
        }));
        idle.extend(
            self.timewait
                .iter()
                .map(|(k, h)| ((hung(&h.life), h.at_ns), Victim::Timewait(*k))),
        );
        idle.extend(
            self.handoffs
                .iter()
                .map(|(k, h)| ((false, h.at_ns), Victim::Handoff(*k))),
        );
        idle.extend(
            self.unclaimed
                .iter()
                .map(|(k, events)| ((false, events.last().ts_ns), Victim::Unclaimed(*k))),
        );
        idle.extend(self.existing.iter().map(|(k, l)| {
            let last = l.since_ns.get().unwrap_or(0);
            ((hung(l), last), Victim::Existing(*k))
        }));
        let n = (self.max_sockets / 8).max(1).min(idle.len());
        if n == 0 {
            return;
        }
        idle.select_nth_unstable_by_key(n - 1, |(key, _)| *key);
        for (_, victim) in &idle[..n] {
            match victim {
                Victim::Full(sk) => {
                    if let Some(life) = self.lives.remove(sk) {
                        let key = SocketKey::Full(*sk);
                        evicted(&mut self.alerts, &life, life.phase(), key, now_ns);
                    }
                }
                Victim::Timewait(tw) => {
                    if let Some(handoff) = self.timewait.remove(tw) {
                        let (life, phase) = (&handoff.life, handoff.phase());
                        let key = SocketKey::Timewait(*tw);
                        evicted(&mut self.alerts, life, phase, key, now_ns);
                    }
                    self.cancelled.take(*tw);
                }
                Victim::Handoff(tuple) => {
                    self.handoffs.remove(tuple);
                }
                Victim::Unclaimed(tuple) => {
                    self.unclaimed.remove(tuple);
                }
                Victim::Existing(tuple) => {
                    if let Some(life) = self.existing.remove(tuple) {
                        let key = SocketKey::Existing(tuple.local(), tuple.remote(), tuple.netns());
                        evicted(&mut self.alerts, &life, life.phase(), key, now_ns);
                    }
                }
            }
        }
        self.losses.evicted += n as u64;
    }
}

/// A socket [`Correlator::make_room`] may drop, by its key in its table.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Full(u64),
    Timewait(u64),
    Handoff(Tuple),
    Unclaimed(Tuple),
    Existing(Tuple),
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        event::{Family, Task, TcpState::*, TimerAction, TimewaitTimer, Transition},
        hung::AlertKind,
        teardown::{Phase, testutil::*},
    };

    #[test]
    fn tables_give_memory_back_after_a_burst_not_while_in_use() {
        let mut c = Correlator::new(1 << 20);
        for sk in 0..50_000 {
            feed(&mut c, sk, &[(1, Close, SynSent)]);
        }
        let (full, _) = c.capacities();
        assert!(full >= 50_000, "{full}");
        let mut out = Vec::new();
        c.expire(2 * MS, &mut out);
        // The burst ends: every connection refused.
        let mut ended = 0;
        for sk in 0..50_000 {
            ended += feed(&mut c, sk, &[(3, SynSent, Close)]).len();
        }
        assert_eq!(ended, 50_000);
        assert!(c.is_empty());
        // A period in which the table held 50,000: kept. One in which it held none: given back.
        c.expire(TRIM_PERIOD_NS + 3 * MS, &mut out);
        assert_eq!(c.capacities().0, full);
        c.expire(2 * TRIM_PERIOD_NS + 4 * MS, &mut out);
        assert!(c.capacities().0 < 4_096, "{:?}", c.capacities());
        assert!(out.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_evictions_counted() {
        let mut c = Correlator::new(64);
        for sk in 0..1_000 {
            feed(&mut c, sk, &[(sk, Close, SynSent)]);
            assert!(c.len() <= 64);
        }
        assert!(c.losses().evicted >= 1_000 - 64);
        // The most recent sockets are still followed.
        let t = one(feed(&mut c, 999, &[(1_000, SynSent, Close)]));
        assert!(t.complete);
    }

    #[test]
    fn timewait_sockets_count_against_the_cap() {
        let mut c = Correlator::new(16);
        let mut out = Vec::new();
        for sk in 0..100u64 {
            let t = |ms: u64, old, new| Transition {
                ts_ns: ms * MS,
                skaddr: sk,
                family: Family::Ipv4,
                local: SocketAddr::new([10, 0, 0, 1].into(), 1_000 + sk as u16),
                remote: SERVER.parse().unwrap(),
                old,
                new,
                task: Task::new(7, 7, "app"),
                placement: crate::event::Placement::default(),
            };
            for (ms, old, new) in [
                (sk, Close, SynSent),
                (sk, SynSent, Established),
                (sk, Established, FinWait1),
                (sk, FinWait1, FinWait2),
                (sk, FinWait2, Close),
            ] {
                c.on_transition(&t(ms, old, new), &mut out);
            }
            c.on_timewait(
                &TimewaitTimer {
                    ts_ns: sk * MS,
                    twaddr: 0x1000 + sk,
                    family: Family::Ipv4,
                    local: SocketAddr::new([10, 0, 0, 1].into(), 1_000 + sk as u16),
                    remote: SERVER.parse().unwrap(),
                    substate: TimeWait,
                    action: TimerAction::Armed,
                    expires_ns: (sk + 60_000) * MS,
                    jiffy_ns: MS,
                    netns: 0,
                },
                &mut out,
            );
            assert!(c.len() <= 16, "{} followed", c.len());
        }
        assert!(out.is_empty());
        assert!(c.losses().evicted >= 100 - 16);
    }

    /// A process leaks a CLOSE_WAIT socket while the host churns through far more sockets than
    /// the table holds: the leak, idlest of all, is still followed, and its close resolves it.
    #[test]
    fn sockets_reported_hung_are_evicted_last() {
        let mut c = Correlator::watching(16, thresholds(&[(Phase::CloseWait, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &[(100, Established, CloseWait)]);
        assert_eq!(poll(&mut c, 1_200).len(), 1);
        for sk in 100..1_000u64 {
            let t = |old, new| Transition {
                ts_ns: (2_000 + sk) * MS,
                skaddr: sk,
                family: Family::Ipv4,
                local: SocketAddr::new([10, 0, 0, 1].into(), sk as u16),
                remote: SERVER.parse().unwrap(),
                old,
                new,
                task: Task::new(7, 7, "app"),
                placement: crate::event::Placement::default(),
            };
            c.on_transition(&t(Close, SynSent), &mut Vec::new());
            assert!(c.len() <= 16);
        }
        assert!(c.losses().evicted >= 900 - 16);
        feed(&mut c, 1, &[(5_000, CloseWait, LastAck)]);
        let resolved = poll(&mut c, 5_001);
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert!(matches!(resolved[0].kind, AlertKind::Resolved { .. }));
        let t = one(feed(&mut c, 1, &[(5_002, LastAck, Close)]));
        assert_eq!(t.phases.get(Phase::CloseWait), Some(4_900 * MS));
    }

    #[test]
    fn a_hung_socket_evicted_anyway_is_reported_evicted() {
        let mut c = Correlator::watching(8, thresholds(&[(Phase::CloseWait, 1_000)]));
        for sk in 1..=8 {
            feed(&mut c, sk, &OPEN);
            feed(&mut c, sk, &[(100 + sk, Established, CloseWait)]);
        }
        let hung = poll(&mut c, 1_200);
        assert_eq!(hung.len(), 8, "{hung:#?}");
        let mut leaks = crate::hung::LeakView::default();
        for a in &hung {
            leaks.observe(a, None);
        }
        // The table holds only hung sockets: the idlest of them makes room for a new one.
        feed(&mut c, 100, &[(2_000, Close, SynSent)]);
        assert_eq!(c.losses().evicted, 1);
        let evicted = poll(&mut c, 2_001);
        assert_eq!(evicted.len(), 1, "{evicted:#?}");
        let a = &evicted[0];
        assert_eq!(a.kind, AlertKind::Evicted { age_ns: 1_899 * MS });
        assert_eq!(
            (a.phase, a.since_ns, a.ts_ns),
            (Phase::CloseWait, 101 * MS, 2_000 * MS)
        );
        assert_eq!(a.key, SocketKey::Full(1));
        // The leak view, and with it the hung gauge, lets go of it.
        leaks.observe(a, None);
        assert!(leaks.hung_by_phase().contains(&(Phase::CloseWait, 7)));
        // The socket's later transitions start a life seen mid-way, with nothing to resolve.
        feed(&mut c, 1, &[(3_000, CloseWait, LastAck)]);
        assert!(poll(&mut c, 3_001).is_empty());
    }
}
