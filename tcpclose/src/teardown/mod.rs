//! The correlation engine: follows each socket through its life and emits one [`Teardown`] per
//! connection, with every disconnect phase timed. Pure: decoded events in, records out; time is
//! whatever the events say (kernel CLOCK_MONOTONIC), plus `now_ns` where the caller expires state.
//!
//! Two sources feed it:
//! - transitions of full sockets (`sock:inet_sock_set_state`);
//! - the timer of timewait sockets. When a socket reaches TIME_WAIT, or FIN_WAIT2 after the
//!   application closed it, `tcp_time_wait()` replaces it by an `inet_timewait_sock` and
//!   `tcp_done()` reports `FIN_WAIT2 -> CLOSE` (or `CLOSING -> CLOSE`) at once. The rest of the
//!   teardown happens on the timewait socket, whose only visible activity is its timer
//!   (`tw_timer_handler`): armed by `inet_twsk_schedule`, fired at expiry, cancelled when the
//!   socket is killed early (reuse, RST).
//!
//! Its parts: `record` (what it emits), `life` (a connection on its full socket), `timewait`
//! (the handoff to a timewait socket and the timer that follows), `cancel` (timer cancels judged
//! by what follows), `capacity` (the cap, eviction, memory given back), `hang` (hung sockets),
//! `census` (what sock_diag says).

mod cancel;
mod capacity;
mod causes;
mod census;
mod hang;
mod life;
mod record;
#[cfg(test)]
mod testutil;
mod timewait;

// The tables are looked up several times per event: foldhash is several times faster than the
// standard SipHash for these keys, and still seeded per process (the 4-tuples come partly from
// remote peers).
use foldhash::{HashMap, HashMapExt as _};

use crate::{
    dense::DenseMap,
    event::{TcpState, TimerAction, TimewaitTimer, Transition},
    hung::{Alert, SocketKey, Thresholds},
};

pub use crate::phase::Phase;
pub use cancel::CANCEL_GRACE_NS;
pub use capacity::TRIM_PERIOD_NS;
pub use causes::{FinRetransmits, RESET_GRACE_NS, RESET_WAIT_NS, Reset, ResetBy};
pub use census::ExistingSocket;
pub use record::{CloseKind, Phases, Side, Teardown, TimewaitEnd};
pub use timewait::{EXPIRE_BATCH, TIMEWAIT_LEN_NS};

use cancel::PendingCancels;
use capacity::Trim;
use causes::UnexplainedResets;
use hang::{DueReports, WatchedStates, phase_changed};
use life::{Life, MaybeNs, Tuple};
use timewait::{Armings, Handoff};

/// Counts of what the engine could not follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Sockets dropped because the table was full (the longest idle go first).
    pub evicted: u64,
    /// Lives cut short without a record: the kernel reused the socket address before tcpclose
    /// saw the previous life end (a lost event).
    pub unfinished: u64,
    /// Handoffs whose timewait socket was never seen: emitted without the phases it would have
    /// timed.
    pub timewait_unseen: u64,
}

/// The per-socket correlation engine.
#[derive(Debug)]
pub struct Correlator {
    lives: DenseMap<u64, Life>,
    /// Full sockets just handed over, by 4-tuple, waiting for their timewait socket's timer.
    handoffs: HashMap<Tuple, Handoff>,
    /// Timewait sockets followed, by address.
    timewait: DenseMap<u64, Handoff>,
    /// Timewait sockets seen before the full socket's `-> CLOSE` (tcp_time_wait() arms the timer
    /// in inet_twsk_schedule() before tcp_done() closes the full socket), by 4-tuple: their
    /// events, replayed when the handoff comes.
    unclaimed: HashMap<Tuple, Armings>,
    /// Sockets in a teardown state found at start-up, by 4-tuple, until an event reveals their
    /// kernel address.
    existing: HashMap<Tuple, Life>,
    /// What the last census found and the next is to confirm (see [`Correlator::reconcile`]):
    /// by 4-tuple, the state and when that census saw it.
    census_candidates: HashMap<Tuple, (TcpState, u64)>,
    /// Timewait sockets whose timer was cancelled: killed, unless the timer is queued again or
    /// fires within [`CANCEL_GRACE_NS`].
    cancelled: PendingCancels,
    max_sockets: usize,
    thresholds: Thresholds,
    /// The thresholds by state, for the sweep.
    watched: WatchedStates,
    /// How often the tables are swept for hung sockets: [`Thresholds::sweep_ns`].
    sweep_ns: u64,
    /// When the tables were last swept for hung sockets.
    swept_ns: Option<u64>,
    /// The earliest time a socket of each table may be due for a hung report: a table is swept
    /// only once it has come.
    due: DueReports,
    alerts: Vec<Alert>,
    /// How long a handoff waits for its timewait socket to appear before it is emitted without.
    handoff_wait_ns: u64,
    /// Whether timewait timer events come in the kernel's order (see
    /// [`Correlator::in_kernel_order`]): a handoff that claims no arming is then complete.
    armed_before_close: bool,
    /// Whether the transitions that end a handshake are left out of the feed (see
    /// [`Correlator::without_handshake_ends`]).
    handshake_ends_unseen: bool,
    /// Whether resets are fed (see [`Correlator::explaining_resets`]).
    explains_resets: bool,
    /// Records of reset connections waiting for the reset sent after their close.
    unexplained: UnexplainedResets,
    /// The latest kernel time among the transitions and causes fed.
    latest_ns: u64,
    trim: Trim,
    losses: Losses,
}

impl Correlator {
    /// `max_sockets` bounds the sockets followed at once (full and timewait sockets, handoffs,
    /// unclaimed timewait sockets and sockets found at start-up together).
    pub fn new(max_sockets: usize) -> Self {
        Self::watching(max_sockets, Thresholds::NONE)
    }

    /// Also reports sockets that stay in a teardown phase longer than its threshold: see
    /// [`Correlator::poll_hung`].
    pub fn watching(max_sockets: usize, thresholds: Thresholds) -> Self {
        Self {
            watched: WatchedStates::new(&thresholds),
            sweep_ns: thresholds.sweep_ns(),
            thresholds,
            swept_ns: None,
            due: DueReports::NONE,
            alerts: Vec::new(),
            lives: DenseMap::new(),
            handoffs: HashMap::new(),
            timewait: DenseMap::new(),
            cancelled: PendingCancels::default(),
            unclaimed: HashMap::new(),
            existing: HashMap::new(),
            census_candidates: HashMap::new(),
            max_sockets: max_sockets.max(8),
            handoff_wait_ns: 2_000_000_000,
            armed_before_close: false,
            handshake_ends_unseen: false,
            explains_resets: false,
            unexplained: UnexplainedResets::default(),
            latest_ns: 0,
            trim: Trim::default(),
            losses: Losses::default(),
        }
    }

    /// Declares that timewait timer events are fed in the order the kernel made them, interleaved
    /// with the transitions (one ring buffer, so one CPU's events stay in order). tcp_time_wait()
    /// arms the timewait socket's timer (inet_twsk_hashdance_schedule()) before tcp_done()
    /// reports the full socket's `-> CLOSE`, on the same CPU: a handoff that finds no such arming
    /// has no timewait socket (the kernel refused one at `tcp_max_tw_buckets`, or the arming was
    /// lost or missed, which the kernel program counts). It is emitted at once instead of being
    /// kept for the wait, which at high churn with the timewait table full would hold seconds of
    /// connections.
    pub fn in_kernel_order(mut self) -> Self {
        self.armed_before_close = true;
        self
    }

    /// Declares that the transitions ending a handshake (`SYN_SENT -> ESTABLISHED`,
    /// `SYN_RECV -> ESTABLISHED`) are not fed: tcpclose leaves them in the kernel when nothing
    /// reads them. A life that leaves ESTABLISHED while still in SYN_SENT or SYN_RECV here then
    /// went through it unseen rather than lost an event, and is still seen whole.
    pub fn without_handshake_ends(mut self) -> Self {
        self.handshake_ends_unseen = true;
        self
    }

    pub fn losses(&self) -> Losses {
        self.losses
    }

    /// Whether any teardown state has a hung threshold.
    pub fn watches_hangs(&self) -> bool {
        !self.thresholds.is_empty()
    }

    /// Sockets followed now.
    pub fn len(&self) -> usize {
        self.lives.len()
            + self.handoffs.len()
            + self.timewait.len()
            + self.unclaimed.len()
            + self.existing.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sockets followed now, by state (timewait sockets by their substate; handoffs not yet
    /// claimed by their timewait socket are not counted). A pass over the tables.
    pub fn state_counts(&self) -> Vec<(TcpState, u64)> {
        let mut counts = [0u64; 13];
        for life in self.lives.values().chain(self.existing.values()) {
            counts[life.state as usize] += 1;
        }
        for handoff in self.timewait.values() {
            let substate = handoff.life.state;
            if matches!(substate, TcpState::FinWait2 | TcpState::TimeWait) {
                counts[substate as usize] += 1;
            }
        }
        TcpState::ALL
            .into_iter()
            .map(|s| (s, counts[s as usize]))
            .collect()
    }

    /// Connections whose teardown has begun and not ended yet (e.g. in TIME_WAIT).
    pub fn in_progress(&self) -> usize {
        self.handoffs.len()
            + self.timewait.len()
            + self.lives.values().filter(|l| l.close.is_some()).count()
    }

    /// Feeds one transition; pushes the teardowns it completes onto `out`.
    pub fn on_transition(&mut self, t: &Transition, out: &mut Vec<Teardown>) {
        use TcpState::*;
        self.latest_ns = self.latest_ns.max(t.ts_ns);
        if !self.cancelled.is_empty() {
            self.end_killed_by(t, out);
        }
        // Listeners are not connections.
        if t.old == Listen && t.new == Close || t.new == Listen {
            if self.lives.remove(&t.skaddr).is_some() {
                self.losses.unfinished += 1;
            }
            return;
        }
        let birth = match (t.old, t.new) {
            (Close, SynSent) => Some(Side::Client),
            (Listen, SynRecv) => Some(Side::Server),
            _ => None,
        };
        if let Some(side) = birth {
            if self.lives.remove(&t.skaddr).is_some() {
                self.losses.unfinished += 1;
            }
            self.make_room(t.ts_ns);
            // SYN_SENT and SYN_RECV are no teardown phase: nothing to watch yet.
            self.lives.insert(
                t.skaddr,
                Life {
                    tuple: Tuple::new(&t.local, &t.remote, t.placement.netns),
                    family: t.family,
                    side: Some(side),
                    complete: true,
                    state: t.new,
                    since_is_lower_bound: false,
                    close: None,
                    born_ns: MaybeNs::at(t.ts_ns),
                    since_ns: MaybeNs::at(t.ts_ns),
                    teardown_start_ns: MaybeNs::UNKNOWN,
                    hung_at_ns: MaybeNs::UNKNOWN,
                    phases: Phases::default(),
                    owner: t.owner().copied(),
                    cgroup: t.placement.cgroup,
                    reset: None,
                    fin_retransmits: FinRetransmits::default(),
                },
            );
            return;
        }

        let life = match self.lives.get_mut(&t.skaddr) {
            Some(life) => life,
            None => {
                let found = if self.existing.is_empty() {
                    None
                } else {
                    self.existing
                        .remove(&Tuple::new(&t.local, &t.remote, t.placement.netns))
                };
                let life = match found {
                    // Found at start-up, now moving on: the same socket.
                    Some(existing) if existing.state == t.old => existing,
                    // Found at start-up already in `t.new`: this event came before the snapshot,
                    // and times the state better than the snapshot did.
                    _ => Life::first_seen(t),
                };
                self.make_room(t.ts_ns);
                self.lives.get_or_insert_with(t.skaddr, || life)
            }
        };
        if self.handshake_ends_unseen
            && t.old == Established
            && matches!(life.state, SynSent | SynRecv)
        {
            // The handshake ended unseen. ESTABLISHED is no phase: when it began is not needed.
            life.state = Established;
        }
        let before = life.phase();
        life.advance(t);
        // An orphaned FIN_WAIT2 goes on on the timewait socket: judged there.
        let handed_over = t.new == Close && t.old == FinWait2;
        if !handed_over {
            let after = life.phase().filter(|_| t.new != Close);
            phase_changed(
                &mut self.alerts,
                life,
                SocketKey::Full(t.skaddr),
                before,
                after,
                t.ts_ns,
            );
        }
        if t.new != Close {
            self.due.lower_full(life.next_report(&self.watched));
            return;
        }
        let Some(life) = self.lives.remove(&t.skaddr) else {
            return;
        };
        match t.old {
            // tcp_time_wait(): the rest happens on a timewait socket.
            FinWait2 | Closing => {
                let key = life.tuple;
                // No hashing of the 4-tuple when no timewait socket waits to be claimed.
                let armed = if self.unclaimed.is_empty() {
                    None
                } else {
                    self.unclaimed
                        .remove(&key)
                        .filter(|events| events.claimed_at(t.ts_ns))
                };
                let handoff = Handoff::new(life, t.ts_ns);
                if armed.is_none() && self.armed_before_close {
                    self.losses.timewait_unseen += 1;
                    out.push(handoff.without_timewait());
                    return;
                }
                if let Some(previous) = self.handoffs.insert(key, handoff) {
                    self.losses.timewait_unseen += 1;
                    out.push(previous.without_timewait());
                }
                for ev in armed.into_iter().flat_map(Armings::into_events) {
                    self.on_timewait(&ev, out);
                }
            }
            _ => self.emit_finished(t.skaddr, life.finish(t.ts_ns), out),
        }
    }

    /// Feeds one timewait timer event; pushes the teardowns it completes onto `out`.
    pub fn on_timewait(&mut self, ev: &TimewaitTimer, out: &mut Vec<Teardown>) {
        let first = !self.end_if_replaced(ev, out);
        if first {
            let tuple = Tuple::new(&ev.local, &ev.remote, ev.netns);
            let Some(handoff) = self.handoffs.remove(&tuple) else {
                if let Some(mut life) = self.existing.remove(&tuple) {
                    // A timewait socket found at start-up: its first timer event is its end (or a
                    // move; either way it is no longer where it was found hung).
                    let before = life.phase();
                    phase_changed(
                        &mut self.alerts,
                        &mut life,
                        SocketKey::Existing(ev.local, ev.remote, ev.netns),
                        before,
                        None,
                        ev.ts_ns,
                    );
                    return;
                }
                self.keep_unclaimed(ev, tuple);
                return;
            };
            self.make_room(ev.ts_ns);
            self.timewait.insert(ev.twaddr, handoff);
        }
        let Some(handoff) = self.timewait.get_mut(&ev.twaddr) else {
            return;
        };
        let key = SocketKey::Timewait(ev.twaddr);
        // Before the first timer event the handoff's phase is unknown: a hang carried over from
        // the full socket is judged against the phase the timer reveals.
        let before = if first {
            handoff
                .life
                .hung_at_ns
                .is_known()
                .then(|| handoff.carried_phase())
        } else {
            handoff.phase()
        };
        match ev.action {
            TimerAction::Armed => {
                self.cancelled.take(ev.twaddr);
                handoff.observe_timer(ev, first);
                let after = handoff.phase();
                phase_changed(
                    &mut self.alerts,
                    &mut handoff.life,
                    key,
                    before,
                    after,
                    ev.ts_ns,
                );
                self.due.lower_timewait(handoff.next_report(&self.watched));
            }
            // Judged by what follows: see `expire`.
            TimerAction::Cancelled => {
                self.cancelled.note(ev);
                if first {
                    let after = handoff.phase();
                    phase_changed(
                        &mut self.alerts,
                        &mut handoff.life,
                        key,
                        before,
                        after,
                        ev.ts_ns,
                    );
                    self.due.lower_timewait(handoff.next_report(&self.watched));
                }
            }
            TimerAction::Fired => {
                self.cancelled.take(ev.twaddr);
                handoff.observe_timer(ev, first);
                if let Some(mut handoff) = self.timewait.remove(&ev.twaddr) {
                    let before = before.or(handoff.phase());
                    phase_changed(
                        &mut self.alerts,
                        &mut handoff.life,
                        key,
                        before,
                        None,
                        ev.ts_ns,
                    );
                    out.push(handoff.into_teardown(ev.ts_ns, TimewaitEnd::Expired));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{hung::AlertKind, teardown::testutil::*};

    /// Random event streams (states, orders, clocks, timers, snapshots in any combination) never
    /// make the engine panic or outgrow its cap, and what it reports stays self-consistent.
    #[test]
    fn random_streams_keep_the_engine_sound() {
        let t = Thresholds::DEFAULT;
        let mut c = Correlator::watching(32, t);
        let (mut out, mut alerts) = (Vec::new(), Vec::new());
        let mut stream = RandomStream::new();
        for _ in 0..200_000 {
            let (step, tick) = stream.step();
            step.feed(&mut c, stream.now, &mut out);
            if tick {
                c.expire(stream.now, &mut out);
                c.poll_hung(stream.now, &mut alerts);
            }
            assert!(c.len() <= 32 + 8, "{} followed", c.len());
            c.assert_due_reports_hold();
            for r in out.drain(..) {
                if let (Some(total), Some(life)) = (r.teardown_ns, r.lifetime_ns) {
                    assert!(total <= life || !r.complete, "{r:?}");
                }
                if r.complete {
                    let sum: u64 = r.phases.iter().map(|(_, ns)| ns).sum();
                    if let Some(total) = r.teardown_ns {
                        assert!(sum <= total, "phases longer than the teardown: {r:?}");
                    }
                }
            }
            for a in alerts.drain(..) {
                if let AlertKind::Hung {
                    age_ns,
                    again: false,
                } = a.kind
                {
                    let threshold = t.get(a.phase).expect("only watched phases hang");
                    assert!(age_ns >= threshold, "{a:?}");
                }
            }
        }
    }
}
