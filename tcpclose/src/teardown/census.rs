//! What a look at the kernel's sockets (sock_diag) tells the engine: the sockets already in a
//! teardown state when tracing began, the census made after missed events, and the verdicts on
//! single sockets the engine may have lost track of.

use std::net::SocketAddr;

use foldhash::{HashMap, HashSet};

use super::{
    Correlator, Phase, Phases, Teardown,
    hang::phase_changed,
    life::{Life, MaybeNs, Tuple},
};
use crate::{
    event::{Family, Placement, TcpState},
    hung::SocketKey,
};

/// A socket that existed before tracing began, as a snapshot of the kernel's sockets shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExistingSocket {
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// When the snapshot saw it (kernel CLOCK_MONOTONIC ns).
    pub seen_ns: u64,
    pub placement: Placement,
}

impl Correlator {
    /// Follows a socket that was in a teardown state before tracing began: it is watched for
    /// hangs (its age a lower bound) and completed by the events that reveal it. Sockets in other
    /// states need nothing: their first event starts them mid-life.
    pub fn adopt_existing(&mut self, s: &ExistingSocket) {
        if Phase::of(s.state).is_none() {
            return;
        }
        if self.len() >= self.max_sockets {
            self.losses.evicted += 1;
            return;
        }
        let tuple = Tuple::new(&s.local, &s.remote, s.placement.netns);
        let life = Life {
            tuple,
            family: s.family,
            side: None,
            complete: false,
            state: s.state,
            since_is_lower_bound: true,
            close: None,
            born_ns: MaybeNs::UNKNOWN,
            since_ns: MaybeNs::at(s.seen_ns),
            teardown_start_ns: MaybeNs::UNKNOWN,
            hung_at_ns: MaybeNs::UNKNOWN,
            phases: Phases::default(),
            owner: None,
            cgroup: s.placement.cgroup,
            reset: None,
            fin_retransmits: Default::default(),
        };
        self.due.lower_existing(life.next_report(&self.watched));
        self.existing.insert(tuple, life);
    }

    /// The states a census lists (see [`Correlator::reconcile`]): those that can be reported
    /// hung.
    pub fn census_states(&self) -> Vec<TcpState> {
        TcpState::ALL
            .into_iter()
            .filter(|&state| self.watched.threshold(state).is_some())
            .collect()
    }

    /// Whether the last census found sockets that the next one is to confirm.
    pub fn census_pending(&self) -> bool {
        !self.census_candidates.is_empty()
    }

    /// Reconciles the engine with `found`, a census of the kernel's sockets in the states of
    /// [`Correlator::census_states`], made because events were missed or lost (the kernel skips
    /// a program run nested in another on the same CPU), so that no hang goes unseen:
    /// - a socket not followed here is followed from then on, as [`Correlator::adopt_existing`]
    ///   does at start-up;
    /// - a full socket followed here in another state than the kernel's, since before the
    ///   census, missed a transition: it moves on to the kernel's state (a hang reported in the
    ///   old one is resolved), its life marked incomplete.
    ///
    /// A socket is taken as the census shows it only when two censuses in a row show it so
    /// (this one and the last): a census reads the kernel while events are on their way, and a
    /// socket passing through a state must not be mistaken for one stuck there. Its age counts
    /// from the first. Returns how many sockets changed.
    pub fn reconcile(&mut self, found: &[ExistingSocket]) -> usize {
        let last = std::mem::take(&mut self.census_candidates);
        // A census lists the few sockets in a watched state; the engine may follow a hundred
        // thousand (timewait sockets under churn). So one pass over what it follows looks each
        // up among the census's, rather than indexing everything it follows: the census is
        // applied on the thread that drains the ring.
        let listed: HashMap<Tuple, &ExistingSocket> = found
            .iter()
            .filter(|s| self.watched.threshold(s.state).is_some())
            .map(|s| (Tuple::new(&s.local, &s.remote, s.placement.netns), s))
            .collect();
        if listed.is_empty() {
            return 0;
        }
        let mut lives_by_tuple: HashMap<Tuple, u64> = HashMap::default();
        for (skaddr, life) in self.lives.iter() {
            if listed.contains_key(&life.tuple) {
                lives_by_tuple.insert(life.tuple, *skaddr);
            }
        }
        let timewait: HashSet<Tuple> = self
            .timewait
            .values()
            .map(|handoff| handoff.life.tuple)
            .filter(|tuple| listed.contains_key(tuple))
            .collect();
        let mut changed = 0;
        for socket in found {
            if self.watched.threshold(socket.state).is_none() {
                continue;
            }
            let tuple = Tuple::new(&socket.local, &socket.remote, socket.placement.netns);
            let life = lives_by_tuple.get(&tuple).copied();
            let differs = match life.and_then(|skaddr| self.lives.get(&skaddr)) {
                Some(life) => life.state != socket.state,
                None => {
                    !(timewait.contains(&tuple)
                        || self.handoffs.contains_key(&tuple)
                        || self.unclaimed.contains_key(&tuple)
                        || self.existing.contains_key(&tuple))
                }
            };
            if !differs {
                continue;
            }
            let first_ns = match last.get(&tuple) {
                Some(&(state, first_ns)) if state == socket.state => first_ns,
                _ => {
                    self.census_candidates
                        .insert(tuple, (socket.state, socket.seen_ns));
                    continue;
                }
            };
            match life {
                Some(skaddr) => {
                    let Some(life) = self.lives.get_mut(&skaddr) else {
                        continue;
                    };
                    if life.since_ns.get().is_some_and(|since| since >= first_ns) {
                        // It changed state since the first census: the engine is not behind.
                        continue;
                    }
                    let before = life.phase();
                    life.state = socket.state;
                    life.since_ns = MaybeNs::at(first_ns);
                    life.since_is_lower_bound = true;
                    life.complete = false;
                    let after = life.phase();
                    let key = SocketKey::Full(skaddr);
                    phase_changed(&mut self.alerts, life, key, before, after, socket.seen_ns);
                    self.due.lower_full(life.next_report(&self.watched));
                }
                None if self.len() < self.max_sockets => {
                    self.adopt_existing(&ExistingSocket {
                        seen_ns: first_ns,
                        ..*socket
                    });
                }
                None => continue,
            }
            changed += 1;
        }
        changed
    }

    /// What sock_diag says of a timewait socket the engine believes in FIN_WAIT2: it is in
    /// TIME_WAIT since about `since_ns`. The peer's FIN moved it there without a timer event
    /// (tcp_timewait_state_process() re-armed the timer within its wheel bucket), so only the
    /// expiry tells when: until the timer fires, `since_ns` stands in. Returns whether the engine
    /// had it in FIN_WAIT2 (a hang reported there is withdrawn, not resolved).
    pub fn timewait_in_time_wait(&mut self, twaddr: u64, since_ns: u64) -> bool {
        let Some(handoff) = self.timewait.get_mut(&twaddr) else {
            return false;
        };
        if handoff.life.state != TcpState::FinWait2 {
            return false;
        }
        handoff.life.state = TcpState::TimeWait;
        handoff.time_wait_from_ns = MaybeNs::at(since_ns.max(handoff.at_ns));
        handoff.provisional = true;
        handoff.life.hung_at_ns = MaybeNs::UNKNOWN;
        self.due.lower_timewait(handoff.next_report(&self.watched));
        true
    }

    /// What sock_diag says of a timewait socket followed here: no timewait socket has its 4-tuple
    /// any more. It ended without tcpclose reading its end as such; it is reported at its
    /// pending cancel if there was one, else incomplete at `now_ns` (and counted unfinished).
    /// A hang reported for it is withdrawn, not resolved.
    pub fn timewait_gone(&mut self, twaddr: u64, now_ns: u64, out: &mut Vec<Teardown>) {
        self.end_unseen(twaddr, now_ns, true, out);
    }

    /// What sock_diag says of a full socket followed here: it is gone, but a timewait socket has
    /// its 4-tuple, in the state the engine has the full socket in. The handoff to it
    /// (`tcp_time_wait()`, then `-> CLOSE`) was missed: the life goes on as that of a socket
    /// found in the kernel, by 4-tuple, which the timewait socket's next timer event ends.
    /// Returns whether it was followed.
    pub fn handed_over_unseen(&mut self, key: SocketKey) -> bool {
        let SocketKey::Full(skaddr) = key else {
            return false;
        };
        let Some(life) = self.lives.remove(&skaddr) else {
            return false;
        };
        self.losses.unfinished += 1;
        let tuple = life.tuple;
        self.due.lower_existing(life.next_report(&self.watched));
        self.existing.entry(tuple).or_insert(life);
        true
    }

    /// What sock_diag says of a full socket followed here (or one found at start-up): no socket
    /// has its 4-tuple any more, in any network namespace. Its end was missed (the kernel skips a
    /// program run nested in another on the same CPU: the summary's `missed`), so its life is
    /// dropped without a record and counted unfinished. A hang already reported for it is the
    /// caller's to resolve. Returns whether it was followed.
    pub fn socket_gone(&mut self, key: SocketKey) -> bool {
        let gone = match key {
            SocketKey::Full(skaddr) => self.lives.remove(&skaddr).is_some(),
            SocketKey::Existing(local, remote, netns) => self
                .existing
                .remove(&Tuple::new(&local, &remote, netns))
                .is_some(),
            SocketKey::Timewait(_) => false,
        };
        if gone {
            self.losses.unfinished += 1;
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{TcpState::*, TimerAction},
        hung::AlertKind,
        teardown::{CloseKind, TimewaitEnd, testutil::*},
    };

    #[test]
    fn a_socket_found_at_start_up_is_watched_and_adopted_by_its_next_event() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 1_000)]));
        c.adopt_existing(&existing(CloseWait, 10));
        // Not a teardown state: nothing to follow.
        c.adopt_existing(&ExistingSocket {
            local: "10.0.0.1:1".parse().unwrap(),
            ..existing(Established, 10)
        });
        assert_eq!(c.len(), 1);
        let hung = poll(&mut c, 1_010);
        assert_eq!(hung.len(), 1);
        assert!(hung[0].since_is_lower_bound);
        assert_eq!(
            hung[0].kind,
            AlertKind::Hung {
                age_ns: 1_000 * MS,
                again: false
            }
        );
        // The application closes it: the event reveals the socket's address.
        let none = feed(&mut c, 9, &[(5_000, CloseWait, LastAck)]);
        assert!(none.is_empty());
        let resolved = poll(&mut c, 5_001);
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert!(resolved[0].since_is_lower_bound);
        assert_eq!(
            resolved[0].kind,
            AlertKind::Resolved {
                stuck_ns: 4_990 * MS
            }
        );
        let t = one(feed(&mut c, 9, &[(5_002, LastAck, Close)]));
        assert_eq!(t.close, CloseKind::Passive);
        assert!(!t.complete);
        assert_eq!(t.phases.get(Phase::CloseWait), None, "seen only in part");
        assert_eq!(t.phases.get(Phase::LastAck), Some(2 * MS));
        assert!(c.is_empty());
    }

    #[test]
    fn an_event_from_before_the_snapshot_is_not_counted_twice() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 1_000)]));
        c.adopt_existing(&existing(CloseWait, 10));
        // Drained after the snapshot, but it happened before: it times the state exactly.
        feed(&mut c, 9, &[(5, Established, CloseWait)]);
        assert_eq!(c.len(), 1, "one socket, not two");
        let hung = poll(&mut c, 1_010);
        assert_eq!(hung.len(), 1, "{hung:?}");
        assert!(!hung[0].since_is_lower_bound);
        assert_eq!(hung[0].since_ns, 5 * MS);
    }

    #[test]
    fn a_census_adopts_an_unfollowed_hang_once_the_next_one_confirms_it() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 1_000)]));
        // Not a watched state: never adopted.
        let unwatched = ExistingSocket {
            local: "10.0.0.1:1".parse().unwrap(),
            ..existing(FinWait1, 10)
        };
        assert_eq!(c.reconcile(&[existing(CloseWait, 10), unwatched]), 0);
        assert!(c.census_pending());
        assert!(
            c.is_empty(),
            "one census may catch a socket passing through"
        );
        assert_eq!(c.reconcile(&[existing(CloseWait, 5_010), unwatched]), 1);
        assert!(!c.census_pending());
        assert_eq!(c.len(), 1);
        let hung = poll(&mut c, 5_011);
        assert_eq!(hung.len(), 1, "{hung:?}");
        assert!(hung[0].since_is_lower_bound);
        assert_eq!(
            hung[0].since_ns,
            10 * MS,
            "its age counts from the first census"
        );
        assert_eq!(
            c.reconcile(&[existing(CloseWait, 10_010)]),
            0,
            "followed now"
        );
    }

    #[test]
    fn a_census_moves_a_socket_that_missed_a_transition_unless_it_moved_since() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 1_000)]));
        feed(&mut c, 1, &OPEN);
        // The kernel has it in CLOSE_WAIT; the engine, which missed the FIN, in ESTABLISHED.
        assert_eq!(c.reconcile(&[existing(CloseWait, 100)]), 0);
        assert_eq!(c.reconcile(&[existing(CloseWait, 5_100)]), 1);
        assert_eq!(c.len(), 1, "the same socket, moved on");
        let hung = poll(&mut c, 5_101);
        assert_eq!(hung.len(), 1, "{hung:?}");
        assert_eq!(hung[0].since_ns, 100 * MS);
        let t = one(feed(
            &mut c,
            1,
            &[(6_000, CloseWait, LastAck), (6_001, LastAck, Close)],
        ));
        assert!(!t.complete, "a transition was missed");

        // Seen in CLOSE_WAIT by the first census, but its event came after it: not behind.
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 1_000)]));
        feed(&mut c, 2, &OPEN);
        assert_eq!(c.reconcile(&[existing(CloseWait, 100)]), 0);
        feed(&mut c, 2, &[(150, Established, FinWait1)]);
        assert_eq!(c.reconcile(&[existing(CloseWait, 5_100)]), 0);
    }

    #[test]
    fn a_census_leaves_alone_what_the_engine_follows_as_the_kernel_has_it() {
        let mut c = Correlator::watching(
            64,
            thresholds(&[(Phase::CloseWait, 1_000), (Phase::FinWait2, 1_000)]),
        );
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &[(50, Established, CloseWait)]);
        for seen_ms in [100, 5_100] {
            assert_eq!(c.reconcile(&[existing(CloseWait, seen_ms)]), 0);
        }
        // A timewait socket in FIN_WAIT2, followed as such.
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait2, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101);
        for seen_ms in [200, 5_200] {
            assert_eq!(c.reconcile(&[existing(FinWait2, seen_ms)]), 0);
        }
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_timewait_socket_found_at_start_up_ends_with_its_timer() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::TimeWait, 1_000)]));
        c.adopt_existing(&existing(TimeWait, 10));
        assert_eq!(poll(&mut c, 1_010).len(), 1);
        assert!(timer(&mut c, 30_000, TimeWait, TimerAction::Fired, 30_000).is_empty());
        let resolved = poll(&mut c, 30_001);
        assert_eq!(resolved.len(), 1);
        assert!(matches!(resolved[0].kind, AlertKind::Resolved { .. }));
        assert!(c.is_empty());
    }

    #[test]
    fn a_fin_seen_only_by_sock_diag_withdraws_a_fin_wait2_hang() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait2, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101);
        // The FIN at 400 ms re-armed the timer in the same bucket: no event.
        let hung = poll(&mut c, 1_200);
        assert_eq!(hung.len(), 1);
        // sock_diag: TIME_WAIT, 59.2 s left at 1.2 s: since ~400 ms.
        assert!(c.timewait_in_time_wait(0xbeef, 400 * MS));
        assert!(!c.timewait_in_time_wait(0xbeef, 400 * MS), "only once");
        assert!(
            poll(&mut c, 5_000).is_empty(),
            "no resolution for a withdrawn hang"
        );
        // The fire's expiry times TIME_WAIT to the jiffy, replacing the estimate.
        let t = one(timer(&mut c, 60_402, TimeWait, TimerAction::Fired, 60_398));
        assert_eq!(t.phases.get(Phase::FinWait2), Some(297 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(60_004 * MS));
        assert_eq!(t.resolution_ns, Some(4 * MS));
        assert!(poll(&mut c, 70_000).is_empty());
    }

    #[test]
    fn a_full_socket_sock_diag_no_longer_shows_is_gone_not_hung() {
        // Its `LAST_ACK -> CLOSE` was missed: it seems to hang in LAST_ACK.
        let mut c = Correlator::watching(64, thresholds(&[(Phase::LastAck, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(
            &mut c,
            1,
            &[(100, Established, CloseWait), (150, CloseWait, LastAck)],
        );
        let alerts = poll(&mut c, 1_200);
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        assert!(c.socket_gone(alerts[0].key));
        assert!(!c.socket_gone(alerts[0].key), "once");
        assert_eq!(c.losses().unfinished, 1);
        assert!(c.is_empty());
        assert!(
            poll(&mut c, 5_000).is_empty(),
            "withdrawn, so never resolved"
        );
        assert!(!c.socket_gone(SocketKey::Timewait(0xbeef)));

        // Shown in another state: the engine is behind. The hang is forgotten, so the event that
        // catches up resolves nothing.
        let mut c = Correlator::watching(64, thresholds(&[(Phase::CloseWait, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &[(100, Established, CloseWait)]);
        let alerts = poll(&mut c, 1_200);
        assert_eq!(alerts.len(), 1, "{alerts:#?}");
        c.withdraw_hang(alerts[0].key);
        feed(&mut c, 1, &[(1_250, CloseWait, LastAck)]);
        assert!(poll(&mut c, 1_300).is_empty());
    }

    #[test]
    fn a_timewait_socket_sock_diag_no_longer_shows_is_gone_not_hung() {
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait2, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101);
        assert_eq!(poll(&mut c, 1_200).len(), 1);
        let mut out = Vec::new();
        c.timewait_gone(0xbeef, 1_200 * MS, &mut out);
        let t = one(out);
        assert!(!t.complete);
        assert_eq!(t.timewait_end, Some(TimewaitEnd::Killed));
        assert_eq!(c.losses().unfinished, 1);
        assert!(c.is_empty());
        assert!(
            poll(&mut c, 5_000).is_empty(),
            "withdrawn, so never resolved"
        );
    }
}
