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

use std::{collections::HashMap, net::SocketAddr};

use crate::event::{Family, Task, TcpState, TimerAction, TimewaitTimer, Transition};

/// TCP_TIMEWAIT_LEN: TIME_WAIT lasts 60 s from the peer's FIN (`include/net/tcp.h`), fixed.
pub const TIMEWAIT_LEN_NS: u64 = 60_000_000_000;

/// A timer cancel is followed within microseconds by its queueing again (`__mod_timer()`) or its
/// firing (`expire_timers()`); one not followed within this is a kill.
pub const CANCEL_GRACE_NS: u64 = 10_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opened by `connect()`.
    Client,
    /// Accepted child of a listener.
    Server,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseKind {
    /// We sent the first FIN (ESTABLISHED -> FIN_WAIT1).
    Active,
    /// The peer's FIN came first (ESTABLISHED -> CLOSE_WAIT).
    Passive,
    /// Both FINs crossed (FIN_WAIT1 -> CLOSING).
    Simultaneous,
    /// Left a synchronized state for CLOSE without completing the FIN exchange (RST sent or
    /// received, `SO_LINGER` 0, close with unread data).
    Reset,
    /// Never established: SYN_SENT or SYN_RECV -> CLOSE (refused, timed out).
    Failed,
    /// We closed, the peer never sent its FIN: the orphaned FIN_WAIT2 timed out after
    /// `net.ipv4.tcp_fin_timeout`.
    FinTimeout,
}

impl CloseKind {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Passive => "passive",
            Self::Simultaneous => "simultaneous",
            Self::Reset => "reset",
            Self::Failed => "failed",
            Self::FinTimeout => "fin_timeout",
        }
    }
}

/// A teardown phase: a state a connection passes through while it closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    FinWait1,
    FinWait2,
    Closing,
    TimeWait,
    CloseWait,
    LastAck,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Self::FinWait1,
        Self::FinWait2,
        Self::Closing,
        Self::TimeWait,
        Self::CloseWait,
        Self::LastAck,
    ];

    pub const fn state(self) -> TcpState {
        match self {
            Self::FinWait1 => TcpState::FinWait1,
            Self::FinWait2 => TcpState::FinWait2,
            Self::Closing => TcpState::Closing,
            Self::TimeWait => TcpState::TimeWait,
            Self::CloseWait => TcpState::CloseWait,
            Self::LastAck => TcpState::LastAck,
        }
    }

    pub const fn name(self) -> &'static str {
        self.state().name()
    }

    pub fn of(state: TcpState) -> Option<Phase> {
        Self::ALL.into_iter().find(|p| p.state() == state)
    }
}

/// Duration of each phase a connection went through; absent where it did not pass or where
/// tcpclose did not see it whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases([Option<u64>; 6]);

impl Phases {
    pub fn get(&self, phase: Phase) -> Option<u64> {
        self.0[phase as usize]
    }

    /// Adds `ns` to `phase` (a connection may pass through a phase more than once).
    pub fn add(&mut self, phase: Phase, ns: u64) {
        let slot = &mut self.0[phase as usize];
        *slot = Some(slot.unwrap_or(0) + ns);
    }

    /// Phases present, in the order of [`Phase::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (Phase, u64)> + '_ {
        Phase::ALL
            .into_iter()
            .filter_map(|p| self.get(p).map(|ns| (p, ns)))
    }
}

/// How a timewait socket ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimewaitEnd {
    /// Its timer fired: TIME_WAIT (or the orphaned FIN_WAIT2) ran its course.
    Expired,
    /// Its timer was cancelled: the kernel killed it early (a new connection reused the 4-tuple,
    /// an RST arrived, or the namespace went away).
    Killed,
}

/// One connection's teardown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Teardown {
    /// When the last phase ended (kernel CLOCK_MONOTONIC ns).
    pub end_ns: u64,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub side: Option<Side>,
    pub close: CloseKind,
    pub phases: Phases,
    /// From leaving ESTABLISHED to the end of the last phase.
    pub teardown_ns: Option<u64>,
    /// From `connect()` or the child's creation to the end.
    pub lifetime_ns: Option<u64>,
    /// Whether tcpclose saw the whole life (from its first state, with no gap).
    pub complete: bool,
    /// The owner, when a system-call transition revealed it.
    pub owner: Option<Task>,
    /// Set when a phase was timed from the kernel's jiffies rather than an event timestamp: the
    /// resolution of those phases.
    pub resolution_ns: Option<u64>,
    /// How the timewait socket ended, when there was one.
    pub timewait_end: Option<TimewaitEnd>,
}

/// A connection's life so far.
#[derive(Clone, Debug)]
struct Life {
    family: Family,
    local: SocketAddr,
    remote: SocketAddr,
    side: Option<Side>,
    born_ns: Option<u64>,
    complete: bool,
    state: TcpState,
    /// When it entered `state`, if seen.
    since_ns: Option<u64>,
    close: Option<CloseKind>,
    teardown_start_ns: Option<u64>,
    phases: Phases,
    owner: Option<Task>,
    last_ns: u64,
}

/// A full socket handed to a timewait socket, waiting for the timewait socket's end.
#[derive(Clone, Debug)]
struct Handoff {
    life: Life,
    /// The full socket's `-> CLOSE`.
    at_ns: u64,
    /// The timewait socket's substate as last seen: FIN_WAIT2 (orphaned, the peer's FIN is still
    /// to come) or TIME_WAIT.
    substate: TcpState,
    /// When TIME_WAIT began, once known.
    time_wait_from_ns: Option<u64>,
    /// Set when `time_wait_from_ns` was derived from the timer's expiry in jiffies.
    resolution_ns: Option<u64>,
}

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
    lives: HashMap<u64, Life>,
    /// Full sockets just handed over, by 4-tuple, waiting for their timewait socket's timer.
    handoffs: HashMap<(SocketAddr, SocketAddr), Handoff>,
    /// Timewait sockets followed, by address.
    timewait: HashMap<u64, Handoff>,
    /// Timewait sockets seen before the full socket's `-> CLOSE` (tcp_time_wait() arms the timer
    /// in inet_twsk_schedule() before tcp_done() closes the full socket), by 4-tuple: their
    /// events, replayed when the handoff comes.
    unclaimed: HashMap<(SocketAddr, SocketAddr), Vec<TimewaitTimer>>,
    /// Timewait sockets whose timer was cancelled, by address: killed, unless the timer is
    /// queued again or fires within [`CANCEL_GRACE_NS`].
    cancelled: HashMap<u64, TimewaitTimer>,
    max_sockets: usize,
    /// How long a handoff waits for its timewait socket to appear before it is emitted without.
    handoff_wait_ns: u64,
    losses: Losses,
}

impl Correlator {
    /// `max_sockets` bounds the sockets followed at once (full and timewait together).
    pub fn new(max_sockets: usize) -> Self {
        Self {
            lives: HashMap::new(),
            handoffs: HashMap::new(),
            timewait: HashMap::new(),
            cancelled: HashMap::new(),
            unclaimed: HashMap::new(),
            max_sockets: max_sockets.max(8),
            handoff_wait_ns: 2_000_000_000,
            losses: Losses::default(),
        }
    }

    pub fn losses(&self) -> Losses {
        self.losses
    }

    /// Sockets followed now.
    pub fn len(&self) -> usize {
        self.lives.len() + self.handoffs.len() + self.timewait.len() + self.unclaimed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            self.make_room();
            self.lives.insert(
                t.skaddr,
                Life {
                    family: t.family,
                    local: t.local,
                    remote: t.remote,
                    side: Some(side),
                    born_ns: Some(t.ts_ns),
                    complete: true,
                    state: t.new,
                    since_ns: Some(t.ts_ns),
                    close: None,
                    teardown_start_ns: None,
                    phases: Phases::default(),
                    owner: t.owner().copied(),
                    last_ns: t.ts_ns,
                },
            );
            return;
        }

        if !self.lives.contains_key(&t.skaddr) {
            self.make_room();
            self.lives.insert(t.skaddr, Life::first_seen(t));
        }
        let Some(life) = self.lives.get_mut(&t.skaddr) else {
            return;
        };
        life.advance(t);
        if t.new != Close {
            return;
        }
        let Some(life) = self.lives.remove(&t.skaddr) else {
            return;
        };
        match t.old {
            // tcp_time_wait(): the rest happens on a timewait socket.
            FinWait2 | Closing => {
                let key = (life.local, life.remote);
                if let Some(previous) = self.handoffs.insert(key, Handoff::new(life, t.ts_ns)) {
                    self.losses.timewait_unseen += 1;
                    out.push(previous.without_timewait());
                }
                for ev in self.unclaimed.remove(&key).unwrap_or_default() {
                    self.on_timewait(&ev, out);
                }
            }
            _ => out.push(life.finish(t.ts_ns)),
        }
    }

    /// Feeds one timewait timer event; pushes the teardowns it completes onto `out`.
    pub fn on_timewait(&mut self, ev: &TimewaitTimer, out: &mut Vec<Teardown>) {
        let first = !self.timewait.contains_key(&ev.twaddr);
        if first {
            let Some(handoff) = self.handoffs.remove(&(ev.local, ev.remote)) else {
                self.keep_unclaimed(ev);
                return;
            };
            self.make_room();
            self.timewait.insert(ev.twaddr, handoff);
        }
        let Some(handoff) = self.timewait.get_mut(&ev.twaddr) else {
            return;
        };
        match ev.action {
            TimerAction::Armed => {
                self.cancelled.remove(&ev.twaddr);
                handoff.observe_timer(ev, first);
            }
            // Judged by what follows: see `expire`.
            TimerAction::Cancelled => {
                self.cancelled.entry(ev.twaddr).or_insert(*ev);
            }
            TimerAction::Fired => {
                self.cancelled.remove(&ev.twaddr);
                handoff.observe_timer(ev, first);
                if let Some(handoff) = self.timewait.remove(&ev.twaddr) {
                    out.push(handoff.into_teardown(ev.ts_ns, TimewaitEnd::Expired));
                }
            }
        }
    }

    /// Keeps the events of a timewait socket created just now, whose full socket's `-> CLOSE` is
    /// still to come. Timewait sockets that were already there when tracing began are not
    /// kept: their first event is not an arming.
    fn keep_unclaimed(&mut self, ev: &TimewaitTimer) {
        let key = (ev.local, ev.remote);
        match self.unclaimed.get_mut(&key) {
            // A handful of events at most before the handoff (armed, maybe moved).
            Some(events) if events.len() < 8 => {
                if events
                    .first()
                    .is_some_and(|first| first.twaddr != ev.twaddr)
                {
                    events.clear();
                }
                events.push(*ev);
            }
            Some(_) => {}
            None if ev.action == TimerAction::Armed => {
                self.make_room();
                self.unclaimed.insert(key, vec![*ev]);
            }
            None => {}
        }
    }

    /// Emits what time alone completes: timewait sockets cancelled more than
    /// [`CANCEL_GRACE_NS`] ago (killed), and handoffs whose timewait socket did not appear within
    /// the wait (timewait tracking unavailable, or the kernel refused a timewait socket:
    /// `tcp_max_tw_buckets`). `now_ns` must not be earlier than the events already fed.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Teardown>) {
        if !self.cancelled.is_empty() {
            let killed: Vec<u64> = self
                .cancelled
                .iter()
                .filter(|(_, ev)| now_ns.saturating_sub(ev.ts_ns) > CANCEL_GRACE_NS)
                .map(|(k, _)| *k)
                .collect();
            for twaddr in killed {
                let Some(ev) = self.cancelled.remove(&twaddr) else {
                    continue;
                };
                if let Some(mut handoff) = self.timewait.remove(&twaddr) {
                    handoff.observe_timer(&ev, false);
                    out.push(handoff.into_teardown(ev.ts_ns, TimewaitEnd::Killed));
                }
            }
        }
        let wait = self.handoff_wait_ns;
        // Timewait sockets whose full socket never handed over: not a connection tcpclose
        // followed (it began before tracing, or its events were lost).
        self.unclaimed.retain(|_, events| {
            events
                .first()
                .is_some_and(|first| now_ns.saturating_sub(first.ts_ns) <= wait)
        });
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
    }

    /// Keeps the tables under their cap: when full, drops the eighth of the full and timewait
    /// sockets that has been idle longest (handoffs leave within `handoff_wait_ns` anyway).
    fn make_room(&mut self) {
        if self.len() < self.max_sockets {
            return;
        }
        let mut idle: Vec<(u64, bool, u64)> = self
            .lives
            .iter()
            .map(|(k, l)| (l.last_ns, false, *k))
            .chain(self.timewait.iter().map(|(k, h)| (h.at_ns, true, *k)))
            .collect();
        let n = (self.max_sockets / 8).max(1).min(idle.len());
        if n == 0 {
            return;
        }
        idle.select_nth_unstable(n - 1);
        for &(_, timewait, key) in &idle[..n] {
            if timewait {
                self.timewait.remove(&key);
                self.cancelled.remove(&key);
            } else {
                self.lives.remove(&key);
            }
        }
        self.losses.evicted += n as u64;
    }
}

impl Life {
    /// A socket first seen mid-life: what it did before is unknown.
    fn first_seen(t: &Transition) -> Self {
        Self {
            family: t.family,
            local: t.local,
            remote: t.remote,
            side: None,
            born_ns: None,
            complete: false,
            state: t.old,
            since_ns: None,
            close: None,
            teardown_start_ns: None,
            phases: Phases::default(),
            owner: None,
            last_ns: t.ts_ns,
        }
    }

    fn advance(&mut self, t: &Transition) {
        use TcpState::*;
        if self.state != t.old {
            // An event was lost: the time in `t.old` is unknown.
            self.complete = false;
            self.since_ns = None;
        }
        let in_old = self.since_ns.and_then(|since| t.ts_ns.checked_sub(since));
        if let Some(phase) = Phase::of(t.old) {
            match in_old {
                Some(ns) => self.phases.add(phase, ns),
                None => self.complete = false,
            }
        }
        // connect() reports CLOSE -> SYN_SENT before the local port is chosen.
        if t.local.port() != 0 {
            self.local = t.local;
            self.remote = t.remote;
        }
        if let Some(owner) = t.owner() {
            self.owner = Some(*owner);
        }
        let close = match (t.old, t.new) {
            (Established, FinWait1) | (Established, CloseWait) => {
                self.teardown_start_ns = Some(t.ts_ns);
                Some(if t.new == FinWait1 {
                    CloseKind::Active
                } else {
                    CloseKind::Passive
                })
            }
            (FinWait1, Closing) => Some(CloseKind::Simultaneous),
            (SynSent | SynRecv, Close) => Some(CloseKind::Failed),
            (Established | CloseWait | FinWait1, Close) => {
                self.teardown_start_ns.get_or_insert(t.ts_ns);
                Some(CloseKind::Reset)
            }
            _ => None,
        };
        if close.is_some() {
            self.close = close;
        } else if self.close.is_none() {
            // First seen mid-teardown: the kind follows from the state.
            self.close = match t.old {
                FinWait1 | FinWait2 => Some(CloseKind::Active),
                Closing => Some(CloseKind::Simultaneous),
                CloseWait | LastAck => Some(CloseKind::Passive),
                _ => None,
            };
        }
        self.state = t.new;
        self.since_ns = Some(t.ts_ns);
        self.last_ns = t.ts_ns;
    }

    fn finish(self, end_ns: u64) -> Teardown {
        Teardown {
            end_ns,
            family: self.family,
            local: self.local,
            remote: self.remote,
            side: self.side,
            close: self.close.unwrap_or(CloseKind::Reset),
            phases: self.phases,
            teardown_ns: self
                .teardown_start_ns
                .and_then(|start| end_ns.checked_sub(start)),
            lifetime_ns: self.born_ns.and_then(|born| end_ns.checked_sub(born)),
            complete: self.complete,
            owner: self.owner,
            resolution_ns: None,
            timewait_end: None,
        }
    }
}

impl Handoff {
    fn new(life: Life, at_ns: u64) -> Self {
        Self {
            // CLOSING -> CLOSE and FIN_WAIT2 -> CLOSE after the peer's FIN both hand over in
            // TIME_WAIT; an orphaned FIN_WAIT2 hands over in FIN_WAIT2. The timer says which.
            substate: life.state,
            life,
            at_ns,
            time_wait_from_ns: None,
            resolution_ns: None,
        }
    }

    fn observe_timer(&mut self, ev: &TimewaitTimer, first: bool) {
        if ev.substate != TcpState::TimeWait || self.time_wait_from_ns.is_some() {
            self.substate = ev.substate;
            return;
        }
        self.time_wait_from_ns = Some(if first && ev.action == TimerAction::Armed {
            // Created in TIME_WAIT (tcp_time_wait(TCP_TIME_WAIT)): it began at the handoff.
            self.at_ns
        } else if self.substate == TcpState::FinWait2 && ev.action == TimerAction::Armed {
            // tcp_timewait_state_process() re-armed the timer on the peer's FIN.
            ev.ts_ns
        } else {
            // The FIN re-armed the timer without a visible `timer_start` (same wheel bucket), or
            // the start was missed: TIME_WAIT began TCP_TIMEWAIT_LEN before the expiry it set.
            self.resolution_ns = Some(ev.jiffy_ns);
            ev.expires_ns
                .saturating_sub(TIMEWAIT_LEN_NS)
                .max(self.at_ns)
        });
        self.substate = TcpState::TimeWait;
    }

    /// The teardown when its timewait socket was never seen: what the full socket showed.
    fn without_timewait(self) -> Teardown {
        let mut teardown = self.life.finish(self.at_ns);
        teardown.complete = false;
        teardown
    }

    /// The teardown, once the timewait socket ended at `end_ns`.
    fn into_teardown(self, end_ns: u64, how: TimewaitEnd) -> Teardown {
        let mut teardown = self.life.finish(end_ns);
        teardown.timewait_end = Some(how);
        match self.time_wait_from_ns {
            Some(from) => {
                // An orphaned FIN_WAIT2 went on from the handoff to the peer's FIN (the full
                // socket's part was counted up to the handoff).
                if from > self.at_ns {
                    teardown.phases.add(Phase::FinWait2, from - self.at_ns);
                }
                teardown
                    .phases
                    .add(Phase::TimeWait, end_ns.saturating_sub(from));
                teardown.resolution_ns = self.resolution_ns;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Task;
    use TcpState::*;

    const MS: u64 = 1_000_000;
    const CLIENT: &str = "10.0.0.1:40000";
    const SERVER: &str = "10.0.0.2:80";

    /// Feeds `(ms, old, new)` steps of socket `sk` (local `CLIENT`, remote `SERVER`).
    fn feed(c: &mut Correlator, sk: u64, steps: &[(u64, TcpState, TcpState)]) -> Vec<Teardown> {
        let mut out = Vec::new();
        for &(ms, old, new) in steps {
            let t = Transition {
                ts_ns: ms * MS,
                skaddr: sk,
                family: Family::Ipv4,
                local: CLIENT.parse().unwrap(),
                remote: SERVER.parse().unwrap(),
                old,
                new,
                task: Task::new(7, 7, "app"),
            };
            c.on_transition(&t, &mut out);
        }
        out
    }

    fn timer(
        c: &mut Correlator,
        ms: u64,
        substate: TcpState,
        action: TimerAction,
        expires_ms: u64,
    ) -> Vec<Teardown> {
        let mut out = Vec::new();
        c.on_timewait(
            &TimewaitTimer {
                ts_ns: ms * MS,
                twaddr: 0xbeef,
                family: Family::Ipv4,
                local: CLIENT.parse().unwrap(),
                remote: SERVER.parse().unwrap(),
                substate,
                action,
                expires_ns: expires_ms * MS,
                jiffy_ns: 4 * MS,
            },
            &mut out,
        );
        out
    }

    fn one(mut out: Vec<Teardown>) -> Teardown {
        assert_eq!(out.len(), 1, "{out:#?}");
        out.remove(0)
    }

    const OPEN: [(u64, TcpState, TcpState); 2] = [(0, Close, SynSent), (1, SynSent, Established)];
    /// close() at 100 ms; the peer ACKs at once; the socket is handed to a timewait socket.
    const ORPHANED_CLOSE: [(u64, TcpState, TcpState); 3] = [
        (100, Established, FinWait1),
        (101, FinWait1, FinWait2),
        (101, FinWait2, Close),
    ];

    #[test]
    fn passive_close_times_close_wait_and_last_ack() {
        let mut c = Correlator::new(64);
        assert!(feed(&mut c, 1, &OPEN).is_empty());
        let t = one(feed(
            &mut c,
            1,
            &[
                (100, Established, CloseWait),
                (400, CloseWait, LastAck),
                (401, LastAck, Close),
            ],
        ));
        assert_eq!(t.close, CloseKind::Passive);
        assert_eq!(t.side, Some(Side::Client));
        assert_eq!(t.phases.get(Phase::CloseWait), Some(300 * MS));
        assert_eq!(t.phases.get(Phase::LastAck), Some(MS));
        assert_eq!(t.phases.get(Phase::FinWait1), None);
        assert_eq!(t.teardown_ns, Some(301 * MS));
        assert_eq!(t.lifetime_ns, Some(401 * MS));
        assert!(t.complete);
        assert_eq!(t.owner.map(|o| o.pid), Some(7));
        assert_eq!(t.timewait_end, None);
        assert!(c.is_empty());
    }

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
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &ORPHANED_CLOSE[..2]);
        assert!(timer(&mut c, 101, FinWait2, TimerAction::Armed, 60_101).is_empty());
        assert!(feed(&mut c, 1, &ORPHANED_CLOSE[2..]).is_empty());
        assert!(timer(&mut c, 401, TimeWait, TimerAction::Armed, 60_401).is_empty());
        let t = one(timer(&mut c, 60_401, TimeWait, TimerAction::Fired, 60_401));
        assert_eq!(t.phases.get(Phase::FinWait2), Some(300 * MS));
        assert_eq!(t.phases.get(Phase::TimeWait), Some(60_000 * MS));
        assert!(t.complete);
        // A timewait socket nobody claims is forgotten after the wait, and not counted.
        assert!(timer(&mut c, 70_000, TimeWait, TimerAction::Armed, 130_000).is_empty());
        assert_eq!(c.len(), 1);
        let mut out = Vec::new();
        c.expire(73_000 * MS, &mut out);
        assert!(out.is_empty());
        assert!(c.is_empty());
        assert_eq!(c.losses(), Losses::default());
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
    fn resets_and_failures() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        let t = one(feed(&mut c, 1, &[(50, Established, Close)]));
        assert_eq!(t.close, CloseKind::Reset);
        assert_eq!(t.teardown_ns, Some(0));
        // Close with unread data after the peer's FIN.
        feed(&mut c, 2, &OPEN);
        let t = one(feed(
            &mut c,
            2,
            &[(50, Established, CloseWait), (70, CloseWait, Close)],
        ));
        assert_eq!(t.close, CloseKind::Reset);
        assert_eq!(t.phases.get(Phase::CloseWait), Some(20 * MS));
        // Refused connect.
        let t = one(feed(&mut c, 3, &[(0, Close, SynSent), (1, SynSent, Close)]));
        assert_eq!(t.close, CloseKind::Failed);
        assert_eq!(t.teardown_ns, None);
        assert_eq!(t.lifetime_ns, Some(MS));
        assert!(c.is_empty());
    }

    #[test]
    fn server_side_life_starts_at_the_child() {
        let mut c = Correlator::new(64);
        let t = one(feed(
            &mut c,
            9,
            &[
                (0, Listen, SynRecv),
                (1, SynRecv, Established),
                (10, Established, CloseWait),
                (20, CloseWait, LastAck),
                (21, LastAck, Close),
            ],
        ));
        assert_eq!(t.side, Some(Side::Server));
        assert!(t.complete);
        // Listeners themselves produce no record.
        assert!(feed(&mut c, 5, &[(0, Close, Listen), (5, Listen, Close)]).is_empty());
    }

    #[test]
    fn mid_life_start_leaves_unseen_phases_absent() {
        let mut c = Correlator::new(64);
        // First seen in CLOSE_WAIT: its duration is unknown, LAST_ACK is timed.
        let t = one(feed(
            &mut c,
            1,
            &[(10, CloseWait, LastAck), (12, LastAck, Close)],
        ));
        assert!(!t.complete);
        assert_eq!(t.close, CloseKind::Passive);
        assert_eq!(t.side, None);
        assert_eq!(t.phases.get(Phase::CloseWait), None);
        assert_eq!(t.phases.get(Phase::LastAck), Some(2 * MS));
        assert_eq!(t.lifetime_ns, None);
        assert_eq!(t.teardown_ns, None);
    }

    #[test]
    fn a_lost_event_marks_the_record_incomplete() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        // ESTABLISHED -> CLOSE_WAIT lost.
        let t = one(feed(
            &mut c,
            1,
            &[(40, CloseWait, LastAck), (41, LastAck, Close)],
        ));
        assert!(!t.complete);
        assert_eq!(t.phases.get(Phase::CloseWait), None);
        assert_eq!(t.phases.get(Phase::LastAck), Some(MS));
    }

    #[test]
    fn reused_address_never_merges_two_lives() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        // The end of the first life was lost; the kernel reuses the address for a new socket.
        assert!(feed(&mut c, 1, &[(500, Close, SynSent)]).is_empty());
        assert_eq!(c.losses().unfinished, 1);
        let t = one(feed(
            &mut c,
            1,
            &[(501, SynSent, Established), (600, Established, Close)],
        ));
        assert_eq!(t.lifetime_ns, Some(100 * MS));
        assert!(t.complete);
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
    fn a_timewait_socket_without_a_full_socket_is_ignored() {
        let mut c = Correlator::new(64);
        assert!(timer(&mut c, 5, TimeWait, TimerAction::Fired, 5).is_empty());
        assert!(c.is_empty());
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
                },
                &mut out,
            );
            assert!(c.len() <= 16, "{} followed", c.len());
        }
        assert!(out.is_empty());
        assert!(c.losses().evicted >= 100 - 16);
    }

    #[test]
    fn clock_going_backwards_gives_no_duration() {
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        let t = one(feed(
            &mut c,
            1,
            &[
                (100, Established, CloseWait),
                (50, CloseWait, LastAck),
                (60, LastAck, Close),
            ],
        ));
        assert_eq!(t.phases.get(Phase::CloseWait), None);
        assert!(!t.complete);
    }
}
