//! The rest of a teardown, on the timewait socket: the full socket's handoff to it, the timer
//! events that follow (armed, moved, fired, cancelled), and the ends they tell.

use super::{
    CANCEL_GRACE_NS, CloseKind, Correlator, Phase, Teardown, TimewaitEnd,
    hang::phase_changed,
    life::{Life, MaybeNs, Tuple},
};
use crate::{
    event::{TcpState, TimerAction, TimewaitTimer, Transition},
    hung::SocketKey,
};

/// TCP_TIMEWAIT_LEN: TIME_WAIT lasts 60 s from the peer's FIN (`include/net/tcp.h`), fixed.
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;

/// Kills [`Correlator::expire`] ends per call. A network namespace that goes away cancels all
/// its timewait sockets at once (inet_twsk_purge()): ending 100k of them in one call would keep
/// the reader from the ring for a good part of a second, and the ring would overflow.
pub const EXPIRE_BATCH: usize = 4096;

/// `__mod_timer()` queues a timer again right after it detached it: an arming this long after a
/// cancel is not a move.
const MOVE_NS: u64 = 1_000_000;

/// tcp_time_wait() arms the new timewait socket's timer microseconds before tcp_done() reports
/// the full socket's `-> CLOSE`: an unclaimed arming older than this at a handoff is not of the
/// socket handed over (with room for a CPU busy with interrupts in between).
const ARMED_BEFORE_HANDOFF_NS: u64 = 10_000_000;

/// A full socket handed to a timewait socket, waiting for the timewait socket's end. The
/// timewait socket's substate is the life's `state`.
#[derive(Clone, Debug)]
pub(super) struct Handoff {
    pub(super) life: Life,
    /// The full socket's `-> CLOSE`.
    pub(super) at_ns: u64,
    /// When TIME_WAIT began, once known.
    pub(super) time_wait_from_ns: MaybeNs,
    /// Set when `time_wait_from_ns` was derived from the timer's expiry in jiffies.
    resolution: Resolution,
    /// `time_wait_from_ns` is an estimate from outside (sock_diag), to be replaced by the
    /// timer's expiry when the timer fires.
    pub(super) provisional: bool,
}

/// The kernel's jiffy (1 s / CONFIG_HZ), as the resolution of a phase timed from a timer's
/// expiry, or none. A jiffy is at most 10 ms (HZ >= 100): 4 bytes hold it (a nonsensical one
/// beyond 4.29 s is kept as that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resolution(u32);

impl Resolution {
    const NONE: Self = Self(u32::MAX);

    fn of_jiffy(jiffy_ns: u64) -> Self {
        Self(
            u32::try_from(jiffy_ns)
                .unwrap_or(u32::MAX - 1)
                .min(u32::MAX - 1),
        )
    }

    fn get(self) -> Option<u64> {
        (self != Self::NONE).then_some(u64::from(self.0))
    }
}

impl Handoff {
    pub(super) fn new(life: Life, at_ns: u64) -> Self {
        Self {
            // The life's state is CLOSE for now: CLOSING -> CLOSE and FIN_WAIT2 -> CLOSE after
            // the peer's FIN both hand over in TIME_WAIT; an orphaned FIN_WAIT2 hands over in
            // FIN_WAIT2. The timer says which.
            life,
            at_ns,
            time_wait_from_ns: MaybeNs::UNKNOWN,
            resolution: Resolution::NONE,
            provisional: false,
        }
    }

    /// The phase the timewait socket is in, since when, and whether that is a lower bound.
    pub(super) fn phase(&self) -> Option<(Phase, u64, bool)> {
        match self.life.state {
            TcpState::TimeWait => Some((Phase::TimeWait, self.time_wait_from_ns.get()?, false)),
            TcpState::FinWait2 => Some(self.carried_phase()),
            _ => None,
        }
    }

    /// The full socket's FIN_WAIT2, going on after the handoff: it began when the full socket
    /// entered it (its FIN_WAIT2 time before the handoff is known when it was seen whole).
    pub(super) fn carried_phase(&self) -> (Phase, u64, bool) {
        match self.life.phases.get(Phase::FinWait2) {
            Some(before) => (Phase::FinWait2, self.at_ns.saturating_sub(before), false),
            None => (Phase::FinWait2, self.at_ns, true),
        }
    }

    pub(super) fn observe_timer(&mut self, ev: &TimewaitTimer, first: bool) {
        if ev.ts_ns < self.at_ns && !(first && ev.action == TimerAction::Armed) {
            // Only tcp_time_wait()'s arming comes before the full socket's `-> CLOSE`: a later
            // event dated earlier is out of timestamp order, and the phases it times unsure.
            self.life.complete = false;
        }
        if ev.substate != TcpState::TimeWait
            || (self.time_wait_from_ns.is_known() && !self.provisional)
        {
            self.life.state = ev.substate;
            return;
        }
        self.time_wait_from_ns = MaybeNs::at(if first && ev.action == TimerAction::Armed {
            // Created in TIME_WAIT (tcp_time_wait(TCP_TIME_WAIT)): it began at the handoff.
            self.at_ns
        } else if self.life.state == TcpState::FinWait2 && ev.action == TimerAction::Armed {
            // tcp_timewait_state_process() re-armed the timer on the peer's FIN.
            ev.ts_ns.max(self.at_ns)
        } else {
            // The FIN re-armed the timer without a visible `timer_start` (same wheel bucket), or
            // the start was missed: TIME_WAIT began TCP_TIMEWAIT_LEN before the expiry it set.
            // The substate says TIME_WAIT at this event, so it began by then: the expiry,
            // rounded up to the jiffy by the timer wheel (or nonsense), must not place it later.
            self.resolution = Resolution::of_jiffy(ev.jiffy_ns);
            ev.expires_ns
                .saturating_sub(TIMEWAIT_LEN_NS)
                .min(ev.ts_ns)
                .max(self.at_ns)
        });
        self.provisional = false;
        self.life.state = TcpState::TimeWait;
    }

    /// The teardown when its timewait socket was never seen: what the full socket showed.
    pub(super) fn without_timewait(self) -> Teardown {
        let mut teardown = self.life.finish(self.at_ns);
        teardown.complete = false;
        teardown
    }

    /// The teardown, once the timewait socket ended at `end_ns`.
    pub(super) fn into_teardown(self, end_ns: u64, how: TimewaitEnd) -> Teardown {
        let mut teardown = self.life.finish(end_ns);
        teardown.timewait_end = Some(how);
        if end_ns < self.at_ns {
            // The timewait socket ended before the full socket handed over to it: records out
            // of timestamp order, or hostile input.
            teardown.complete = false;
        }
        match self.time_wait_from_ns.get() {
            Some(from) => {
                // Between the handoff and the end, whatever the order of the timestamps (an
                // estimate from the expiry or by sock_diag, records out of order).
                let from = from.min(end_ns).max(self.at_ns);
                // An orphaned FIN_WAIT2 went on from the handoff to the peer's FIN (the full
                // socket's part was counted up to the handoff).
                if from > self.at_ns {
                    teardown.phases.add(Phase::FinWait2, from - self.at_ns);
                }
                teardown
                    .phases
                    .add(Phase::TimeWait, end_ns.saturating_sub(from));
                teardown.resolution_ns = self.resolution.get();
            }
            None => {
                // Still FIN_WAIT2 at the end: the peer never sent its FIN.
                teardown
                    .phases
                    .add(Phase::FinWait2, end_ns.saturating_sub(self.at_ns));
                if how == TimewaitEnd::Expired {
                    teardown.close = CloseKind::FinTimeout;
                }
            }
        }
        teardown
    }
}

impl Correlator {
    /// Ends a followed timewait socket whose end was not read as such: at its pending cancel
    /// if there was one (a kill), else incomplete at `fallback_ns` (counted unfinished). With
    /// `withdraw`, a hang reported for it is dropped instead of resolved.
    pub(super) fn end_unseen(
        &mut self,
        twaddr: u64,
        fallback_ns: u64,
        withdraw: bool,
        out: &mut Vec<Teardown>,
    ) {
        let cancel = self.cancelled.take(twaddr);
        let Some(mut old) = self.timewait.remove(&twaddr) else {
            return;
        };
        if withdraw {
            old.life.hung_at_ns = MaybeNs::UNKNOWN;
        }
        let before = old.phase();
        let end_ns = match cancel {
            Some(c) => {
                let timer = c.timer(twaddr, &old.life);
                old.observe_timer(&timer, false);
                c.ts_ns
            }
            None => {
                self.losses.unfinished += 1;
                old.life.complete = false;
                fallback_ns
            }
        };
        let key = SocketKey::Timewait(twaddr);
        phase_changed(&mut self.alerts, &mut old.life, key, before, None, end_ns);
        out.push(old.into_teardown(end_ns, TimewaitEnd::Killed));
    }

    /// The kernel reuses a freed timewait socket's memory for the next one (slab), so an event at
    /// a known address may belong to a new timewait socket whose predecessor's end was not seen
    /// as such: its kill was a cancel that the new socket's arming seemed to answer. A different
    /// 4-tuple, an arming long after the cancel (a move re-arms within microseconds), or a
    /// substate going back from TIME_WAIT to FIN_WAIT2 (tcp_timewait_state_process() only ever
    /// moves it forward) means a new socket: the old one ended at its cancel (or, without one,
    /// unseen). A new socket on the same 4-tuple armed within microseconds of the kill is caught
    /// earlier, by its full socket's transitions: see [`Correlator::end_killed_by`]. Returns
    /// whether a timewait socket followed at `ev`'s address is still there (the same one).
    pub(super) fn end_if_replaced(&mut self, ev: &TimewaitTimer, out: &mut Vec<Teardown>) -> bool {
        let Some(known) = self.timewait.get(&ev.twaddr) else {
            return false;
        };
        let cancel = self.cancelled.get(ev.twaddr);
        let other_tuple = known.life.tuple != Tuple::new(&ev.local, &ev.remote, ev.netns);
        let late_arming = ev.action == TimerAction::Armed
            && cancel.is_some_and(|c| ev.ts_ns.saturating_sub(c.ts_ns) > MOVE_NS);
        let went_back = known.life.state == TcpState::TimeWait && ev.substate == TcpState::FinWait2;
        if !other_tuple && !late_arming && !went_back {
            return true;
        }
        self.end_unseen(ev.twaddr, ev.ts_ns, false, out);
        false
    }

    /// A full socket on the 4-tuple of a timewait socket whose timer was just cancelled: the
    /// timewait socket was killed for it (a SYN accepted by tcp_timewait_state_process(), or
    /// connect() reusing the port through tcp_twsk_unique()). It ends at its cancel now, before
    /// the new connection's own timewait socket, which the slab may place at the same address
    /// microseconds later, could pass for a timer move.
    pub(super) fn end_killed_by(&mut self, t: &Transition, out: &mut Vec<Teardown>) {
        if let Some(twaddr) =
            self.cancelled
                .on_tuple(&Tuple::new(&t.local, &t.remote, t.placement.netns))
        {
            self.end_unseen(twaddr, t.ts_ns, false, out);
        }
    }

    /// Keeps the events of a timewait socket created just now, whose full socket's `-> CLOSE` is
    /// still to come. Timewait sockets that were already there when tracing began are not
    /// kept: their first event is not an arming. A 4-tuple holds one timewait socket at a time,
    /// so the list follows the latest: an arming that starts a new one (see [`starts_anew`])
    /// replaces it, and an event of another timewait socket on the 4-tuple drops it.
    pub(super) fn keep_unclaimed(&mut self, ev: &TimewaitTimer, key: Tuple) {
        let Some(events) = self.unclaimed.get_mut(&key) else {
            if ev.action == TimerAction::Armed {
                self.make_room(ev.ts_ns);
                self.unclaimed.insert(key, Armings::new(*ev));
            }
            return;
        };
        if starts_anew(events.last(), ev) {
            if ev.action == TimerAction::Armed {
                *events = Armings::new(*ev);
            } else {
                self.unclaimed.remove(&key);
            }
        } else {
            events.push(*ev);
        }
    }

    /// Emits what time alone completes: timewait sockets cancelled more than
    /// [`CANCEL_GRACE_NS`] ago (killed), and handoffs whose timewait socket did not appear within
    /// the wait (timewait tracking unavailable, or the kernel refused a timewait socket:
    /// `tcp_max_tw_buckets`). `now_ns` must not be earlier than the events already fed.
    ///
    /// Ends at most [`EXPIRE_BATCH`] killed timewait sockets per call, the longest cancelled
    /// first; returns whether more are due, for the caller to call again once it has read the
    /// ring.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Teardown>) -> bool {
        let mut more = false;
        if !self.cancelled.is_empty() {
            let before_ns = now_ns.saturating_sub(CANCEL_GRACE_NS);
            for twaddr in self.cancelled.due(before_ns, EXPIRE_BATCH) {
                // Ended at the cancel: a kill.
                self.end_unseen(twaddr, now_ns, false, out);
            }
            more = self.cancelled.any_due(before_ns);
        }
        let wait = self.handoff_wait_ns;
        // Timewait sockets whose full socket never handed over: not a connection tcpclose
        // followed (it began before tracing, or its events were lost).
        self.unclaimed
            .retain(|_, events| now_ns.saturating_sub(events.first.ts_ns) <= wait);
        let stale: Vec<_> = self
            .handoffs
            .iter()
            .filter(|(_, h)| now_ns.saturating_sub(h.at_ns) > wait)
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            if let Some(h) = self.handoffs.remove(&key) {
                self.losses.timewait_unseen += 1;
                out.push(h.without_timewait());
            }
        }
        self.release_unexplained(now_ns, out);
        self.trim(now_ns);
        more
    }
}

/// Whether timer event `ev` is of another timewait socket than the one whose latest event was
/// `last`, on the same 4-tuple: another address, or the same one after the previous socket ended
/// (its timer fired, or was cancelled and not queued again at once: see [`MOVE_NS`]) or with its
/// substate going back from TIME_WAIT to FIN_WAIT2 (the slab reused the address).
fn starts_anew(last: &TimewaitTimer, ev: &TimewaitTimer) -> bool {
    last.twaddr != ev.twaddr
        || match last.action {
            TimerAction::Fired => true,
            TimerAction::Cancelled => {
                ev.action == TimerAction::Armed && ev.ts_ns.saturating_sub(last.ts_ns) > MOVE_NS
            }
            TimerAction::Armed => {
                last.substate == TcpState::TimeWait && ev.substate == TcpState::FinWait2
            }
        }
}

/// The events of an unclaimed timewait socket (see [`Correlator::keep_unclaimed`]): its arming,
/// and the few that may follow before the handoff (a move). Every connection that reaches
/// TIME_WAIT passes through here: the first event is kept inline, so that a lone arming, the
/// usual case, allocates nothing.
#[derive(Debug)]
pub(super) struct Armings {
    first: TimewaitTimer,
    later: Vec<TimewaitTimer>,
}

impl Armings {
    /// A handful of events at most before the handoff (armed, maybe moved).
    const MAX: usize = 8;

    pub(super) fn new(first: TimewaitTimer) -> Self {
        Self {
            first,
            later: Vec::new(),
        }
    }

    pub(super) fn last(&self) -> &TimewaitTimer {
        self.later.last().unwrap_or(&self.first)
    }

    pub(super) fn push(&mut self, ev: TimewaitTimer) {
        if 1 + self.later.len() < Self::MAX {
            self.later.push(ev);
        }
    }

    pub(super) fn into_events(self) -> impl Iterator<Item = TimewaitTimer> {
        std::iter::once(self.first).chain(self.later)
    }

    /// Whether these are the events of the timewait socket a full socket hands over to at
    /// `handoff_ns`: tcp_time_wait() arms its timer (inet_twsk_schedule()) microseconds before
    /// tcp_done() reports the full socket's `-> CLOSE`, and nothing can end it in between. An
    /// older arming, or a timer that already fired or was cancelled, is an earlier timewait
    /// socket's on the 4-tuple, whose own full socket was not followed: replayed, its end would
    /// end this connection.
    pub(super) fn claimed_at(&self, handoff_ns: u64) -> bool {
        self.last().action == TimerAction::Armed
            && handoff_ns.saturating_sub(self.first.ts_ns) <= ARMED_BEFORE_HANDOFF_NS
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        event::{Family, Task, TcpState::*},
        teardown::{Losses, testutil::*},
    };

    #[test]
    fn orphaned_fin_wait2_continues_on_the_timewait_socket() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        // close(): FIN_WAIT1, ACK, then at once handed to a timewait socket in FIN_WAIT2.
        let none = feed(&mut c, 1, &ORPHANED_CLOSE);
        assert!(none.is_empty(), "waits for the timewait socket");
        assert!(timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101).is_empty());
        // The peer's FIN 300 ms later re-arms the timer into another bucket.
        assert!(timer(&mut c, 401, TimeWait, TimerAction::Armed, 60_401).is_empty());
        let t = one(timer(&mut c, 60_600, TimeWait, TimerAction::Fired, 60_401));
        assert_eq!(t.close, CloseKind::Active);
        assert_eq!(t.phases.get(Phase::FinWait1), Some(MS));
        assert_eq!(t.phases.get(Phase::FinWait2), Some(300 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(60_199 * MS));
        assert_eq!(t.teardown_ns, Some(60_500 * MS));
        assert_eq!(t.end_ns, 60_600 * MS);
        assert_eq!(t.resolution_ns, None, "every phase timed by an event");
        assert_eq!(t.timewait_end, Some(TimewaitEnd::Expired));
        assert!(t.complete);
        assert!(c.is_empty());
    }

    #[test]
    fn a_cancel_before_firing_or_moving_is_not_a_kill() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101);
        // __mod_timer() moves the timer to another bucket on the FIN: cancel, then start.
        assert!(timer(&mut c, 401, TimeWait, TimerAction::Cancelled, 60_101).is_empty());
        assert!(timer(&mut c, 401, TimeWait, TimerAction::Armed, 60_401).is_empty());
        let mut out = Vec::new();
        c.expire(1_000 * MS, &mut out);
        assert!(out.is_empty(), "the move was not a kill");
        // expire_timers() detaches the timer before it calls it: cancel, then fire.
        assert!(timer(&mut c, 60_401, TimeWait, TimerAction::Cancelled, 60_401).is_empty());
        let t = one(timer(&mut c, 60_401, TimeWait, TimerAction::Fired, 60_401));
        assert_eq!(t.timewait_end, Some(TimewaitEnd::Expired));
        assert_eq!(t.phases.get(Phase::FinWait2), Some(300 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(60_000 * MS));
        c.expire(70_000 * MS, &mut out);
        assert!(out.is_empty());
        assert!(c.is_empty());
    }

    #[test]
    fn timer_armed_before_the_full_socket_closes() {
        // tcp_time_wait() arms the timewait socket's timer before tcp_done() reports CLOSE.
        for mut c in [Correlator::new(64), Correlator::new(64).in_kernel_order()] {
            timer_armed_before_the_full_socket_closes_in(&mut c);
        }
    }

    fn timer_armed_before_the_full_socket_closes_in(c: &mut Correlator) {
        feed(c, 1, &OPEN);
        feed(c, 1, &ORPHANED_CLOSE[..2]);
        assert!(timer(c, 101, FinWait2, TimerAction::Armed, 60_101).is_empty());
        assert!(feed(c, 1, &ORPHANED_CLOSE[2..]).is_empty());
        assert!(timer(c, 401, TimeWait, TimerAction::Armed, 60_401).is_empty());
        let t = one(timer(c, 60_401, TimeWait, TimerAction::Fired, 60_401));
        assert_eq!(t.phases.get(Phase::FinWait2), Some(300 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(60_000 * MS));
        assert!(t.complete);
        // A timewait socket nobody claims is forgotten after the wait, and not counted.
        assert!(timer(c, 70_000, TimeWait, TimerAction::Armed, 130_000).is_empty());
        assert_eq!(c.len(), 1);
        let mut out = Vec::new();
        c.expire(73_000 * MS, &mut out);
        assert!(out.is_empty());
        assert!(c.is_empty());
        assert_eq!(c.losses(), Losses::default());
    }

    /// Containers reuse addresses: the same 4-tuple closes in two network namespaces at once,
    /// and each timewait socket continues the full socket of its own namespace.
    #[test]
    fn the_same_tuple_in_two_namespaces_is_two_connections() {
        const A: u32 = 4_026_531_840;
        const B: u32 = 4_026_532_000;
        let (tw_a, tw_b) = ((A, 0xa), (B, 0xb));
        // B's FIN is acked 100 ms after A's. tcp_time_wait() arms each timewait socket's timer
        // before tcp_done() reports its full socket's CLOSE.
        let b_close = [
            (100, Established, FinWait1),
            (201, FinWait1, FinWait2),
            (201, FinWait2, Close),
        ];
        for mut c in [Correlator::new(64), Correlator::new(64).in_kernel_order()] {
            let c = &mut c;
            feed_in(c, A, 1, &OPEN);
            feed_in(c, B, 2, &OPEN);
            feed_in(c, A, 1, &ORPHANED_CLOSE[..2]);
            assert!(timer_in(c, tw_a, 101, FinWait2, TimerAction::Armed, 60_101).is_empty());
            assert!(feed_in(c, A, 1, &ORPHANED_CLOSE[2..]).is_empty());
            feed_in(c, B, 2, &b_close[..2]);
            assert!(timer_in(c, tw_b, 201, FinWait2, TimerAction::Armed, 60_201).is_empty());
            assert!(feed_in(c, B, 2, &b_close[2..]).is_empty());
            // The peers' FINs: A's at 300 ms, B's at 700 ms.
            assert!(timer_in(c, tw_a, 300, TimeWait, TimerAction::Armed, 60_300).is_empty());
            assert!(timer_in(c, tw_b, 700, TimeWait, TimerAction::Armed, 60_700).is_empty());
            let a = one(timer_in(
                c,
                tw_a,
                60_300,
                TimeWait,
                TimerAction::Fired,
                60_300,
            ));
            let b = one(timer_in(
                c,
                tw_b,
                60_700,
                TimeWait,
                TimerAction::Fired,
                60_700,
            ));
            assert_eq!(a.placement.netns, A);
            assert_eq!(b.placement.netns, B);
            assert_eq!(a.phases.get(Phase::FinWait1), Some(MS));
            assert_eq!(b.phases.get(Phase::FinWait1), Some(101 * MS));
            assert_eq!(a.phases.get(Phase::FinWait2), Some(199 * MS));
            assert_eq!(b.phases.get(Phase::FinWait2), Some(499 * MS));
            assert_eq!(a.phases.get(Phase::TimeWait), Some(60_000 * MS));
            assert_eq!(b.phases.get(Phase::TimeWait), Some(60_000 * MS));
            assert!(a.complete && b.complete, "{a:#?}\n{b:#?}");
            assert!(c.is_empty());
        }
    }

    #[test]
    fn fin_seen_only_through_the_expiry_is_timed_in_jiffies() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101);
        // No second timer_start: the FIN at ~300 ms is known from the expiry it set.
        let t = one(timer(&mut c, 60_500, TimeWait, TimerAction::Fired, 60_300));
        assert_eq!(t.phases.get(Phase::FinWait2), Some(199 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(60_200 * MS));
        assert_eq!(t.resolution_ns, Some(4 * MS));
    }

    #[test]
    fn orphaned_fin_wait2_that_times_out() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, FinWait2, TimerAction::Armed, 2_101);
        let t = one(timer(&mut c, 2_110, FinWait2, TimerAction::Fired, 2_101));
        assert_eq!(t.close, CloseKind::FinTimeout);
        assert_eq!(t.phases.get(Phase::FinWait2), Some(2_009 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), None);
    }

    #[test]
    fn half_close_keeps_fin_wait2_on_the_full_socket() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        // shutdown(SHUT_WR): the full socket waits in FIN_WAIT2 until the FIN, then TIME_WAIT.
        feed(
            &mut c,
            1,
            &[
                (100, Established, FinWait1),
                (101, FinWait1, FinWait2),
                (351, FinWait2, Close),
            ],
        );
        timer(&mut c, 351, TimeWait, TimerAction::Armed, 60_351);
        // Killed early (e.g. the 4-tuple was reused): a cancel that nothing follows.
        assert!(timer(&mut c, 10_351, TimeWait, TimerAction::Cancelled, 60_351).is_empty());
        let mut out = Vec::new();
        c.expire(10_351 * MS + CANCEL_GRACE_NS, &mut out);
        assert!(out.is_empty(), "within the grace");
        c.expire(10_352 * MS + CANCEL_GRACE_NS, &mut out);
        let t = one(out);
        assert_eq!(t.end_ns, 10_351 * MS);
        assert_eq!(t.phases.get(Phase::FinWait2), Some(250 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(10_000 * MS));
        assert_eq!(t.timewait_end, Some(TimewaitEnd::Killed));
        assert_eq!(t.close, CloseKind::Active);
    }

    #[test]
    fn simultaneous_close_goes_through_closing() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(
            &mut c,
            1,
            &[
                (100, Established, FinWait1),
                (120, FinWait1, Closing),
                (150, Closing, Close),
            ],
        );
        timer(&mut c, 150, TimeWait, TimerAction::Armed, 60_150);
        let t = one(timer(&mut c, 60_160, TimeWait, TimerAction::Fired, 60_150));
        assert_eq!(t.close, CloseKind::Simultaneous);
        assert_eq!(t.phases.get(Phase::FinWait1), Some(20 * MS));
        assert_eq!(t.phases.get(Phase::Closing), Some(30 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(60_010 * MS));
    }

    #[test]
    fn handoff_without_a_timewait_socket_is_emitted_after_the_wait() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        let mut out = Vec::new();
        c.expire(1_000 * MS, &mut out);
        assert!(out.is_empty());
        c.expire(3_000 * MS, &mut out);
        let t = one(out);
        assert!(!t.complete);
        assert_eq!(t.phases.get(Phase::TimeWait), None);
        assert_eq!(t.end_ns, 101 * MS);
        assert_eq!(c.losses().timewait_unseen, 1);
        assert!(c.is_empty());
    }

    #[test]
    fn in_kernel_order_a_handoff_that_claims_no_arming_is_emitted_at_once() {
        let mut c = Correlator::new(64).in_kernel_order();
        feed(&mut c, 1, &OPEN);
        // A stale arming on the 4-tuple is not this connection's timewait socket.
        assert!(timer(&mut c, 50, FinWait2, TimerAction::Armed, 60_050).is_empty());
        let t = one(feed(&mut c, 1, &ORPHANED_CLOSE));
        assert!(!t.complete);
        assert_eq!(t.phases.get(Phase::TimeWait), None);
        assert_eq!(t.phases.get(Phase::FinWait1), Some(MS));
        assert_eq!(t.end_ns, 101 * MS);
        assert_eq!(c.losses().timewait_unseen, 1);
        assert!(c.is_empty());
    }

    #[test]
    fn a_timewait_socket_without_a_full_socket_is_ignored() {
        let mut c = Correlator::new(64);
        assert!(timer(&mut c, 5, TimeWait, TimerAction::Fired, 5).is_empty());
        assert!(c.is_empty());
    }

    #[test]
    fn a_mass_kill_is_ended_in_batches() {
        let n = EXPIRE_BATCH as u64 + 10;
        let mut c = Correlator::new(2 * n as usize);
        let mut out = Vec::new();
        let local = |sk: u64| SocketAddr::new([10, 0, (sk >> 8) as u8, sk as u8].into(), 1_000);
        let tw = |sk: u64, ms: u64, action| TimewaitTimer {
            ts_ns: ms * MS,
            twaddr: 0x10_000 + sk,
            family: Family::Ipv4,
            local: local(sk),
            remote: SERVER.parse().unwrap(),
            substate: TimeWait,
            action,
            expires_ns: 60_000 * MS,
            jiffy_ns: 4 * MS,
            netns: 0,
        };
        for sk in 0..n {
            let t = |old, new| Transition {
                ts_ns: MS,
                skaddr: sk,
                family: Family::Ipv4,
                local: local(sk),
                remote: SERVER.parse().unwrap(),
                old,
                new,
                task: Task::new(7, 7, "app"),
                placement: crate::event::Placement::default(),
            };
            for (old, new) in [
                (Established, FinWait1),
                (FinWait1, FinWait2),
                (FinWait2, Close),
            ] {
                c.on_transition(&t(old, new), &mut out);
            }
            c.on_timewait(&tw(sk, 1, TimerAction::Armed), &mut out);
        }
        assert!(out.is_empty());
        // Cancelled in reverse order of address, 1 ms apart from 1 s on.
        for sk in (0..n).rev() {
            c.on_timewait(&tw(sk, 1_000 + (n - sk), TimerAction::Cancelled), &mut out);
        }
        let now = (2_000 + n) * MS;
        assert!(c.expire(now, &mut out), "more are due");
        assert_eq!(out.len(), EXPIRE_BATCH);
        let ends: Vec<u64> = out.iter().map(|t| t.end_ns).collect();
        assert!(ends.is_sorted(), "earliest cancel first");
        assert_eq!(ends[0], 1_001 * MS);
        assert!(
            out.iter()
                .all(|t| t.timewait_end == Some(TimewaitEnd::Killed))
        );
        out.clear();
        assert!(!c.expire(now, &mut out), "none left");
        assert_eq!(out.len(), 10);
        assert!(c.is_empty());
    }

    #[test]
    fn a_timewait_socket_at_a_reused_address_is_a_new_one() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, TimeWait, TimerAction::Armed, 60_101);
        // Killed at 5 s (cancel); 3 ms later, at the same address, another connection's timewait
        // socket is armed, before the grace would have judged the cancel.
        assert!(timer(&mut c, 5_000, TimeWait, TimerAction::Cancelled, 60_101).is_empty());
        let mut out = Vec::new();
        let other = TimewaitTimer {
            ts_ns: 5_003 * MS,
            twaddr: 0xbeef,
            family: Family::Ipv4,
            local: "10.0.0.1:41000".parse().unwrap(),
            remote: SERVER.parse().unwrap(),
            substate: TimeWait,
            action: TimerAction::Armed,
            expires_ns: 65_003 * MS,
            jiffy_ns: 4 * MS,
            netns: 0,
        };
        c.on_timewait(&other, &mut out);
        let t = one(out);
        assert_eq!(t.timewait_end, Some(TimewaitEnd::Killed));
        assert_eq!(t.end_ns, 5_000 * MS);
        assert_eq!(t.local, CLIENT.parse().unwrap());
        assert!(t.complete);
        // Same 4-tuple, armed well after the cancel: a new socket too.
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, TimeWait, TimerAction::Armed, 60_101);
        timer(&mut c, 5_000, TimeWait, TimerAction::Cancelled, 60_101);
        let t = one(timer(&mut c, 5_005, TimeWait, TimerAction::Armed, 65_005));
        assert_eq!(t.end_ns, 5_000 * MS);
    }

    #[test]
    fn a_new_connection_on_the_tuple_of_a_killed_timewait_socket_ends_it_at_the_kill() {
        // Seen in a minute of loopback churn: a timewait socket in TIME_WAIT is killed by a SYN
        // on its 4-tuple; the new connection is closed first by its side at once and its
        // orphaned FIN_WAIT2 timewait socket lands at the same address 400 us after the kill,
        // which once passed for a move of the old timer (and a FIN_WAIT2 hang of the old
        // connection, back from TIME_WAIT).
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait2, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, TimeWait, TimerAction::Armed, 60_101);
        let us = |us: u64| us * 1_000;
        let at = |t: &mut Correlator, ns: u64, old, new| {
            let mut out = Vec::new();
            t.on_transition(
                &Transition {
                    ts_ns: ns,
                    skaddr: 2,
                    family: Family::Ipv4,
                    local: CLIENT.parse().unwrap(),
                    remote: SERVER.parse().unwrap(),
                    old,
                    new,
                    task: Task::new(8, 8, "app"),
                    placement: crate::event::Placement::default(),
                },
                &mut out,
            );
            out
        };
        timer(&mut c, 5_000, TimeWait, TimerAction::Cancelled, 60_101);
        // The new full socket on the same 4-tuple reveals the kill.
        let old = one(at(&mut c, 5_000 * MS + us(100), SynSent, Established));
        assert_eq!(old.timewait_end, Some(TimewaitEnd::Killed));
        assert_eq!(old.end_ns, 5_000 * MS);
        assert_eq!(old.phases.get(Phase::TimeWait), Some(4_899 * MS));
        assert!(old.complete);
        assert!(at(&mut c, 5_000 * MS + us(200), Established, FinWait1).is_empty());
        assert!(at(&mut c, 5_000 * MS + us(400), FinWait1, FinWait2).is_empty());
        let mut out = Vec::new();
        c.on_timewait(
            &TimewaitTimer {
                ts_ns: 5_000 * MS + us(400),
                twaddr: 0xbeef,
                family: Family::Ipv4,
                local: CLIENT.parse().unwrap(),
                remote: SERVER.parse().unwrap(),
                substate: FinWait2,
                action: TimerAction::Armed,
                expires_ns: 65_000 * MS,
                jiffy_ns: 4 * MS,
                netns: 0,
            },
            &mut out,
        );
        assert!(out.is_empty(), "{out:#?}");
        assert!(at(&mut c, 5_000 * MS + us(400), FinWait2, Close).is_empty());
        // The peer's FIN 250 ms later re-arms within the bucket (no event); the old connection
        // is not hung, and the new one is followed on its own timewait socket.
        assert!(poll(&mut c, 5_200).is_empty());
        let new = one(timer(&mut c, 65_250, TimeWait, TimerAction::Fired, 65_250));
        assert_eq!(new.owner, Some(Task::new(8, 8, "app")));
        assert_eq!(new.timewait_end, Some(TimewaitEnd::Expired));
        assert!(c.is_empty());

        // Without the new socket's transitions (filtered out, or lost), the substate going back
        // from TIME_WAIT to FIN_WAIT2 still tells a new socket from a move.
        let mut c = Correlator::watching(64, thresholds(&[(Phase::FinWait2, 1_000)]));
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE);
        timer(&mut c, 101, TimeWait, TimerAction::Armed, 60_101);
        timer(&mut c, 5_000, TimeWait, TimerAction::Cancelled, 60_101);
        let old = one(timer(&mut c, 5_000, FinWait2, TimerAction::Armed, 65_000));
        assert_eq!(old.end_ns, 5_000 * MS);
        assert_eq!(old.timewait_end, Some(TimewaitEnd::Killed));
        assert!(
            poll(&mut c, 7_000).is_empty(),
            "no hang of the old connection"
        );
    }
}
