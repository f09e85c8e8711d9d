//! Hung sockets in the engine: which sockets have stayed in a watched phase past its threshold,
//! found by sweeps that skip the tables where none can be due yet, and the alerts when a hang
//! ends or leaves the table. The thresholds and alerts themselves are [`crate::hung`]'s.

use super::{
    Correlator, Phase,
    life::{Life, MaybeNs, Tuple},
    timewait::Handoff,
};
use crate::{
    event::TcpState,
    hung::{Alert, AlertKind, REPORT_AGAIN_NS, SocketKey, Thresholds},
};

/// The hung thresholds by TCP state, for the sweep: a socket's state alone tells whether it can
/// hang, without working out its phase.
#[derive(Clone, Copy, Debug)]
pub(super) struct WatchedStates([Option<u64>; 13]);

impl WatchedStates {
    pub(super) fn new(thresholds: &Thresholds) -> Self {
        let mut by_state = [None; 13];
        for phase in Phase::ALL {
            by_state[phase.state() as usize] = thresholds.get(phase);
        }
        Self(by_state)
    }

    /// The threshold of the phase a socket in `state` is in (a full socket's state, or a timewait
    /// socket's substate), if that phase is watched.
    pub(super) fn threshold(&self, state: TcpState) -> Option<u64> {
        self.0[state as usize]
    }
}

/// The earliest time a socket of each swept table may be due for a hung report (`u64::MAX`:
/// none can be). Each is the earliest of the table's sockets at its last sweep, lowered since by
/// every socket that changed phase there; sockets that left only make it earlier than needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DueReports {
    pub(super) full: u64,
    pub(super) timewait: u64,
    pub(super) existing: u64,
}

impl DueReports {
    pub(super) const NONE: Self = Self {
        full: u64::MAX,
        timewait: u64::MAX,
        existing: u64::MAX,
    };

    pub(super) fn lower_full(&mut self, due_ns: u64) {
        self.full = self.full.min(due_ns);
    }

    pub(super) fn lower_timewait(&mut self, due_ns: u64) {
        self.timewait = self.timewait.min(due_ns);
    }

    pub(super) fn lower_existing(&mut self, due_ns: u64) {
        self.existing = self.existing.min(due_ns);
    }
}

impl Correlator {
    /// Pushes onto `out` the alerts due at `now_ns`: sockets that have stayed in their phase
    /// longer than its threshold (or were reported at least [`REPORT_AGAIN_NS`] ago and are still
    /// there), and reported sockets that have moved on since the last call.
    ///
    /// The tables are swept at most every [`Thresholds::sweep_ns`] (a tenth of the shortest
    /// threshold: a report comes at most that late), and a table only once one of its sockets
    /// may be due: each table keeps the earliest time one of them is, found by the sweep and
    /// lowered whenever a socket changes phase. A socket healthy churn moves on before its
    /// threshold costs no sweep; a sweep that does run costs a pass over its table. Nothing is
    /// kept per socket in between, so memory stays bounded by the table whatever the churn.
    pub fn poll_hung(&mut self, now_ns: u64, out: &mut Vec<Alert>) {
        let due = self
            .swept_ns
            .is_none_or(|swept| now_ns.saturating_sub(swept) >= self.sweep_ns);
        if due && !self.thresholds.is_empty() {
            self.swept_ns = Some(now_ns);
            let watched = &self.watched;
            if now_ns >= self.due.full {
                let mut next = u64::MAX;
                for (sk, life) in self.lives.iter_mut() {
                    // Most are in ESTABLISHED or the handshake, no teardown phase: judged by
                    // their state alone.
                    let Some(threshold) = watched.threshold(life.state) else {
                        continue;
                    };
                    let phase = life.phase();
                    let key = SocketKey::Full(*sk);
                    next = next.min(check_hung(threshold, life, phase, key, now_ns, out));
                }
                self.due.full = next;
            }
            if now_ns >= self.due.timewait {
                let mut next = u64::MAX;
                for (tw, handoff) in self.timewait.iter_mut() {
                    // Mostly in TIME_WAIT, which lasts its fixed 60 s and is not watched unless
                    // asked for: judged by their substate alone.
                    let Some(threshold) = watched.threshold(handoff.life.state) else {
                        continue;
                    };
                    let phase = handoff.phase();
                    let key = SocketKey::Timewait(*tw);
                    let life = &mut handoff.life;
                    next = next.min(check_hung(threshold, life, phase, key, now_ns, out));
                }
                self.due.timewait = next;
            }
            if now_ns >= self.due.existing {
                let mut next = u64::MAX;
                for (tuple, life) in &mut self.existing {
                    let Some(threshold) = watched.threshold(life.state) else {
                        continue;
                    };
                    let phase = life.phase();
                    let key = SocketKey::Existing(tuple.local(), tuple.remote(), tuple.netns());
                    next = next.min(check_hung(threshold, life, phase, key, now_ns, out));
                }
                self.due.existing = next;
            }
        }
        out.append(&mut self.alerts);
    }

    /// Whether the engine still has the hang `alert` reported: the same socket, hung in the same
    /// phase since the same time. An answer about a hang that the engine has moved past since
    /// (its socket changed phase, ended or left the table) is stale and must not change it.
    pub fn hang_is_current(&self, alert: &Alert) -> bool {
        let (life, phase) = match alert.key {
            SocketKey::Full(skaddr) => match self.lives.get(&skaddr) {
                Some(life) => (life, life.phase()),
                None => return false,
            },
            SocketKey::Existing(local, remote, netns) => {
                match self.existing.get(&Tuple::new(&local, &remote, netns)) {
                    Some(life) => (life, life.phase()),
                    None => return false,
                }
            }
            SocketKey::Timewait(twaddr) => match self.timewait.get(&twaddr) {
                Some(handoff) => (&handoff.life, handoff.phase()),
                None => return false,
            },
        };
        life.hung_at_ns.is_known()
            && matches!(phase, Some((p, since, _)) if p == alert.phase && since == alert.since_ns)
    }

    /// A hang sock_diag contradicts (it shows the socket in another state: the engine is behind
    /// the kernel): forgotten, so that the socket's next phase does not resolve it. The caller
    /// drops it if it was about to be reported first, and resolves it if it was reported before.
    /// Still there, it is judged again at a sweep within [`REPORT_AGAIN_NS`].
    pub fn withdraw_hang(&mut self, key: SocketKey) {
        let life = match key {
            SocketKey::Full(skaddr) => self.lives.get_mut(&skaddr),
            SocketKey::Existing(local, remote, netns) => {
                self.existing.get_mut(&Tuple::new(&local, &remote, netns))
            }
            SocketKey::Timewait(twaddr) => self.timewait.get_mut(&twaddr).map(|h| &mut h.life),
        };
        if let Some(life) = life {
            life.hung_at_ns = MaybeNs::UNKNOWN;
        }
    }
}

/// When a socket in its phase since `since_ns` is due for a hung report: once `threshold` has
/// passed, then [`REPORT_AGAIN_NS`] after each report.
fn report_due(threshold: u64, since_ns: u64, hung_at_ns: MaybeNs) -> u64 {
    match hung_at_ns.get() {
        Some(at) => at.saturating_add(REPORT_AGAIN_NS),
        None => since_ns.saturating_add(threshold),
    }
}

/// Reports `life` if it has stayed in `phase` past `threshold` (its phase's), or again if it
/// was reported [`REPORT_AGAIN_NS`] ago and is still there. Returns when it is due next
/// (`u64::MAX`: never, its phase's start being unknown).
fn check_hung(
    threshold: u64,
    life: &mut Life,
    phase: Option<(Phase, u64, bool)>,
    key: SocketKey,
    now_ns: u64,
    out: &mut Vec<Alert>,
) -> u64 {
    let Some((phase, since_ns, lower_bound)) = phase else {
        return u64::MAX;
    };
    let due = report_due(threshold, since_ns, life.hung_at_ns);
    if now_ns < due {
        return due;
    }
    let again = life.hung_at_ns.is_known();
    life.hung_at_ns = MaybeNs::at(now_ns);
    out.push(life.alert(
        AlertKind::Hung {
            age_ns: now_ns.saturating_sub(since_ns),
            again,
        },
        phase,
        since_ns,
        lower_bound,
        key,
        now_ns,
    ));
    report_due(threshold, since_ns, life.hung_at_ns)
}

/// A followed socket went from phase `before` to phase `after` (either may be none) at `ts_ns`:
/// a hang reported in `before` is resolved. (The same phase at a new place, full socket to
/// timewait socket, goes on hanging.)
pub(super) fn phase_changed(
    alerts: &mut Vec<Alert>,
    life: &mut Life,
    key: SocketKey,
    before: Option<(Phase, u64, bool)>,
    after: Option<(Phase, u64, bool)>,
    ts_ns: u64,
) {
    if matches!((before, after), (Some(b), Some(a)) if b.0 == a.0) {
        return;
    }
    if let (Some(_), Some((phase, since, lower_bound))) = (life.hung_at_ns.take(), before) {
        alerts.push(life.alert(
            AlertKind::Resolved {
                stuck_ns: ts_ns.saturating_sub(since),
            },
            phase,
            since,
            lower_bound,
            key,
            ts_ns,
        ));
    }
}

/// Reports a socket dropped from the table at `now_ns` while reported hung in `phase`.
pub(super) fn evicted(
    alerts: &mut Vec<Alert>,
    life: &Life,
    phase: Option<(Phase, u64, bool)>,
    key: SocketKey,
    now_ns: u64,
) {
    if let (true, Some((phase, since, lower_bound))) = (life.hung_at_ns.is_known(), phase) {
        let age_ns = now_ns.saturating_sub(since);
        let kind = AlertKind::Evicted { age_ns };
        alerts.push(life.alert(kind, phase, since, lower_bound, key, now_ns));
    }
}

impl Life {
    /// When it is due for a hung report in its phase (`u64::MAX`: never).
    pub(super) fn next_report(&self, watched: &WatchedStates) -> u64 {
        let Some(threshold) = watched.threshold(self.state) else {
            return u64::MAX;
        };
        match self.phase() {
            Some((_, since_ns, _)) => report_due(threshold, since_ns, self.hung_at_ns),
            None => u64::MAX,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn alert(
        &self,
        kind: AlertKind,
        phase: Phase,
        since_ns: u64,
        since_is_lower_bound: bool,
        key: SocketKey,
        ts_ns: u64,
    ) -> Alert {
        Alert {
            kind,
            phase,
            ts_ns,
            since_ns,
            since_is_lower_bound,
            family: self.family,
            local: self.tuple.local(),
            remote: self.tuple.remote(),
            owner: self.owner,
            placement: self.placement(),
            key,
        }
    }
}

impl Handoff {
    /// When it is due for a hung report in its phase (`u64::MAX`: never).
    pub(super) fn next_report(&self, watched: &WatchedStates) -> u64 {
        let Some(threshold) = watched.threshold(self.life.state) else {
            return u64::MAX;
        };
        match self.phase() {
            Some((_, since_ns, _)) => report_due(threshold, since_ns, self.life.hung_at_ns),
            None => u64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{TcpState::*, TimerAction},
        teardown::{CloseKind, testutil::*},
    };

    #[test]
    fn a_leaked_close_wait_is_reported_again_slowly_then_resolved() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &[(100, Established, CloseWait)]);
        assert!(poll(&mut c, 1_000).is_empty());
        // Swept every 200 ms (a tenth of 1 s, raised to SWEEP_MIN_NS): reported at the first sweep
        // past the threshold.
        assert!(poll(&mut c, 1_150).is_empty(), "not swept again yet");
        let hung = poll(&mut c, 1_200);
        assert_eq!(hung.len(), 1, "{hung:?}");
        assert_eq!(hung[0].phase, Phase::CloseWait);
        assert_eq!(
            hung[0].kind,
            AlertKind::Hung {
                age_ns: 1_100 * MS,
                again: false
            }
        );
        assert_eq!(hung[0].since_ns, 100 * MS);
        assert!(!hung[0].since_is_lower_bound);
        assert_eq!(hung[0].local, CLIENT.parse().unwrap());
        // Not flooded: nothing until REPORT_AGAIN_NS has passed.
        for ms in (1_300..61_200).step_by(1_000) {
            assert!(poll(&mut c, ms).is_empty(), "at {ms} ms");
        }
        let again = poll(&mut c, 61_200);
        assert_eq!(again.len(), 1);
        assert!(matches!(again[0].kind, AlertKind::Hung { again: true, .. }));
        // The application finally closes it.
        feed(&mut c, 1, &[(70_000, CloseWait, LastAck)]);
        let resolved = poll(&mut c, 70_001);
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert_eq!(
            resolved[0].kind,
            AlertKind::Resolved {
                stuck_ns: 69_900 * MS
            }
        );
        assert_eq!(resolved[0].phase, Phase::CloseWait);
        assert_eq!(resolved[0].owner.map(|o| o.pid), Some(7));
        // LAST_ACK is not watched; the end resolves nothing more.
        feed(&mut c, 1, &[(70_001, LastAck, Close)]);
        assert!(poll(&mut c, 200_000).is_empty());
    }

    #[test]
    fn short_phases_and_reused_addresses_raise_nothing() {
        let mut c = Correlator::watching(
            64,
            thresholds(&[(Phase::CloseWait, 1_000), (Phase::LastAck, 1_000)]),
        );
        feed(&mut c, 1, &OPEN);
        feed(
            &mut c,
            1,
            &[
                (100, Established, CloseWait),
                (900, CloseWait, LastAck),
                (901, LastAck, Close),
            ],
        );
        // The same socket address, a new life, in CLOSE_WAIT since 1 500 ms: the first life's
        // entry must not report the second early.
        feed(
            &mut c,
            1,
            &[(1_000, Close, SynSent), (1_001, SynSent, Established)],
        );
        feed(&mut c, 1, &[(1_500, Established, CloseWait)]);
        assert!(poll(&mut c, 2_300).is_empty());
        assert_eq!(poll(&mut c, 2_500).len(), 1);
    }

    #[test]
    fn an_orphaned_fin_wait2_hangs_across_the_handoff() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait2, 1_000)]));
        feed(&mut c, 1, &OPEN);
        // shutdown(SHUT_WR) at 100 ms: FIN_WAIT2 on the full socket from 101 ms.
        feed(
            &mut c,
            1,
            &[(100, Established, FinWait1), (101, FinWait1, FinWait2)],
        );
        let hung = poll(&mut c, 1_200);
        assert_eq!(hung.len(), 1);
        assert_eq!(hung[0].key, SocketKey::Full(1));
        // close() at 5 s: handed to a timewait socket, still FIN_WAIT2. Not resolved.
        timer(&mut c, 5_000, FinWait2, TimerAction::Armed, 90_000);
        feed(&mut c, 1, &[(5_000, FinWait2, Close)]);
        assert!(poll(&mut c, 5_001).is_empty());
        // Still reported again, at its new place.
        let again = poll(&mut c, 61_200);
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].key, SocketKey::Timewait(0xbeef));
        // The peer's FIN at 62 s ends FIN_WAIT2: resolved after 61.899 s.
        timer(&mut c, 62_000, TimeWait, TimerAction::Armed, 122_000);
        let resolved = poll(&mut c, 62_001);
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert_eq!(
            resolved[0].kind,
            AlertKind::Resolved {
                stuck_ns: 61_899 * MS
            }
        );
        assert_eq!(resolved[0].key, SocketKey::Timewait(0xbeef));
    }

    #[test]
    fn a_timewait_fin_wait2_is_watched_from_the_full_sockets_entry() {
        // close() with the peer silent: orphaned at once; hung while on the timewait socket.
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait2, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101);
        assert!(poll(&mut c, 900).is_empty());
        let hung = poll(&mut c, 1_101);
        assert_eq!(hung.len(), 1, "{hung:?}");
        assert_eq!(hung[0].since_ns, 101 * MS);
        assert_eq!(hung[0].key, SocketKey::Timewait(0xbeef));
        // tcp_fin_timeout: the timer fires in FIN_WAIT2; the hang ends with the socket.
        let t = one(timer(&mut c, 60_101, FinWait2, TimerAction::Fired, 60_101));
        assert_eq!(t.close, CloseKind::FinTimeout);
        let resolved = poll(&mut c, 60_102);
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            resolved[0].kind,
            AlertKind::Resolved {
                stuck_ns: 60_000 * MS
            }
        );
    }

    /// The sweep skips the tables where no socket is due yet: over random streams, it reports
    /// exactly what a sweep of every socket at every sweep does.
    #[test]
    fn skipping_tables_not_due_misses_no_report() {
        let mut t = thresholds(&[
            (Phase::FinWait1, 3_000),
            (Phase::FinWait2, 1_000),
            (Phase::TimeWait, 20_000),
            (Phase::CloseWait, 2_000),
        ]);
        let only_time_wait = thresholds(&[(Phase::TimeWait, 5_000)]);
        for thresholds in [Thresholds::DEFAULT, only_time_wait, t, {
            t.set(Phase::TimeWait, None);
            t
        }] {
            let mut skipping = Correlator::watching(32, thresholds);
            let mut every = Correlator::watching(32, thresholds);
            let mut stream = RandomStream::new();
            let (mut out, mut expected_out) = (Vec::new(), Vec::new());
            let mut reported = 0;
            for _ in 0..100_000 {
                let (step, tick) = stream.step();
                step.feed(&mut skipping, stream.now, &mut out);
                step.feed(&mut every, stream.now, &mut expected_out);
                if !tick {
                    continue;
                }
                skipping.expire(stream.now, &mut out);
                every.expire(stream.now, &mut expected_out);
                let (mut alerts, mut expected) = (Vec::new(), Vec::new());
                skipping.poll_hung(stream.now, &mut alerts);
                every.due = DueReports {
                    full: 0,
                    timewait: 0,
                    existing: 0,
                };
                every.poll_hung(stream.now, &mut expected);
                // The tables' order of iteration differs from one engine to the other.
                let sorted = |v: &mut Vec<Alert>| {
                    let mut v: Vec<String> = v.drain(..).map(|a| format!("{a:?}")).collect();
                    v.sort();
                    v
                };
                reported += expected.len();
                assert_eq!(sorted(&mut alerts), sorted(&mut expected));
                assert_eq!(out.len(), expected_out.len());
                out.clear();
                expected_out.clear();
            }
            assert!(
                reported > 100,
                "{reported} alerts: the streams hang sockets"
            );
        }
    }

    #[test]
    fn the_sweep_interval_follows_the_shortest_threshold() {
        // A 20 s threshold: swept every 2 s (a report at most 2 s late).
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 20_000)]));
        assert_eq!(c.sweep_ns, 2_000 * MS);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &[(100, Established, CloseWait)]);
        let mut reported = Vec::new();
        for ms in (0..25_000).step_by(50) {
            let alerts = poll(&mut c, ms);
            if !alerts.is_empty() {
                reported.push((ms, alerts));
            }
        }
        // Swept at 0, 2 s, ..., 20 s: due at 20.1 s, reported at the sweep of 22 s.
        assert_eq!(reported.len(), 1, "{reported:?}");
        let (at, alerts) = &reported[0];
        assert_eq!(*at, 22_000);
        assert_eq!(
            alerts[0].kind,
            AlertKind::Hung {
                age_ns: 21_900 * MS,
                again: false
            }
        );
        // A short threshold is swept for every fifth of a second at most.
        let c = Correlator::watching(64, thresholds(&[(Phase::LastAck, 500)]));
        assert_eq!(c.sweep_ns, 200 * MS);
    }

    #[test]
    fn a_phase_without_a_threshold_is_never_reported() {
        // Only FIN_WAIT1 watched: a CLOSE_WAIT leak, a LAST_ACK and TIME_WAIT held for minutes
        // raise nothing, and the tables where nothing can hang are not swept at all.
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait1, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, TimeWait, TimerAction::Armed, 600_101);
        feed(&mut c, 2, &OPEN);
        feed(&mut c, 2, &[(100, Established, CloseWait)]);
        feed(&mut c, 3, &OPEN);
        feed(
            &mut c,
            3,
            &[(100, Established, CloseWait), (200, CloseWait, LastAck)],
        );
        assert_eq!(c.len(), 3);
        // Socket 1 went through FIN_WAIT1, due at 1.1 s had it stayed: its table is swept once
        // after (every 200 ms: at 1.2 s), and found with nothing that can hang.
        assert_eq!(c.due.full, 1_100 * MS);
        assert_eq!(c.due.timewait, u64::MAX);
        for ms in (0..600_000).step_by(50) {
            assert!(poll(&mut c, ms).is_empty(), "at {ms} ms");
            if ms >= 1_200 {
                assert_eq!(c.due, DueReports::NONE, "at {ms} ms");
            }
        }
        // A socket in FIN_WAIT1 can: the full sockets' table is due then.
        feed(&mut c, 4, &OPEN);
        feed(&mut c, 4, &[(600_000, Established, FinWait1)]);
        assert_eq!(c.due.full, 601_000 * MS);
        assert_eq!(c.due.timewait, u64::MAX);
        assert_eq!(poll(&mut c, 601_000).len(), 1);
        // Reported: due again REPORT_AGAIN_NS later.
        assert_eq!(c.due.full, 601_000 * MS + REPORT_AGAIN_NS);
    }
}
