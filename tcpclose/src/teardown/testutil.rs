//! What the engine's tests share: builders of one connection's transitions and timer events
//! (`CLIENT` to `SERVER`), of thresholds and of sockets found in the kernel, and random event
//! streams.

use std::net::SocketAddr;

use super::{Correlator, ExistingSocket, Phase, Teardown};
use crate::{
    event::{Family, Task, TcpState, TcpState::*, TimerAction, TimewaitTimer, Transition},
    hung::{Alert, Thresholds},
};

pub(super) const MS: u64 = 1_000_000;
pub(super) const CLIENT: &str = "10.0.0.1:40000";
pub(super) const SERVER: &str = "10.0.0.2:80";

/// Feeds `(ms, old, new)` steps of socket `sk` (local `CLIENT`, remote `SERVER`).
pub(super) fn feed(
    c: &mut Correlator,
    sk: u64,
    steps: &[(u64, TcpState, TcpState)],
) -> Vec<Teardown> {
    feed_in(c, 0, sk, steps)
}

/// [`feed`] in the network namespace `netns`.
pub(super) fn feed_in(
    c: &mut Correlator,
    netns: u32,
    sk: u64,
    steps: &[(u64, TcpState, TcpState)],
) -> Vec<Teardown> {
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
            placement: crate::event::Placement { netns, cgroup: 0 },
        };
        c.on_transition(&t, &mut out);
    }
    out
}

pub(super) fn timer(
    c: &mut Correlator,
    ms: u64,
    substate: TcpState,
    action: TimerAction,
    expires_ms: u64,
) -> Vec<Teardown> {
    timer_in(c, (0, 0xbeef), ms, substate, action, expires_ms)
}

/// [`timer`] of the timewait socket `twaddr` in the network namespace `netns`.
pub(super) fn timer_in(
    c: &mut Correlator,
    (netns, twaddr): (u32, u64),
    ms: u64,
    substate: TcpState,
    action: TimerAction,
    expires_ms: u64,
) -> Vec<Teardown> {
    let mut out = Vec::new();
    c.on_timewait(
        &TimewaitTimer {
            ts_ns: ms * MS,
            twaddr,
            family: Family::Ipv4,
            local: CLIENT.parse().unwrap(),
            remote: SERVER.parse().unwrap(),
            substate,
            action,
            expires_ns: expires_ms * MS,
            jiffy_ns: 4 * MS,
            netns,
        },
        &mut out,
    );
    out
}

pub(super) fn one(mut out: Vec<Teardown>) -> Teardown {
    assert_eq!(out.len(), 1, "{out:#?}");
    out.remove(0)
}

pub(super) const OPEN: [(u64, TcpState, TcpState); 2] =
    [(0, Close, SynSent), (1, SynSent, Established)];

/// close() at 100 ms; the peer ACKs at once; the socket is handed to a timewait socket.
pub(super) const ORPHANED_CLOSE: [(u64, TcpState, TcpState); 3] = [
    (100, Established, FinWait1),
    (101, FinWait1, FinWait2),
    (101, FinWait2, Close),
];

pub(super) fn thresholds(phases: &[(Phase, u64)]) -> Thresholds {
    let mut t = Thresholds::NONE;
    for &(phase, ms) in phases {
        t.set(phase, Some(ms * MS));
    }
    t
}

pub(super) fn poll(c: &mut Correlator, ms: u64) -> Vec<Alert> {
    let mut out = Vec::new();
    c.poll_hung(ms * MS, &mut out);
    out
}

pub(super) fn existing(state: TcpState, seen_ms: u64) -> ExistingSocket {
    ExistingSocket {
        family: Family::Ipv4,
        local: CLIENT.parse().unwrap(),
        remote: SERVER.parse().unwrap(),
        state,
        seen_ns: seen_ms * MS,
        placement: crate::event::Placement::default(),
    }
}

/// One step of a random event stream.
pub(super) enum Step {
    Transition(Transition),
    Timewait(TimewaitTimer),
    Existing(ExistingSocket),
    /// sock_diag shows the timewait socket in TIME_WAIT since then.
    InTimeWait(u64, u64),
    /// sock_diag no longer shows the timewait socket.
    Gone(u64),
}

/// Random event streams: states, orders, clocks (mostly forward, sometimes backwards),
/// timers, snapshots and sock_diag's word in any combination, over 64 sockets, 64 4-tuples
/// and 16 timewait socket addresses.
pub(super) struct RandomStream {
    seed: u64,
    pub(super) now: u64,
}

impl RandomStream {
    pub(super) fn new() -> Self {
        Self {
            seed: 0x9e37_79b9_7f4a_7c15,
            now: 0,
        }
    }

    fn next(&mut self, n: u64) -> u64 {
        // xorshift64*
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }

    /// The next step, at `self.now`, and whether time-driven work is due after it.
    pub(super) fn step(&mut self) -> (Step, bool) {
        let tuple = |n: u64| SocketAddr::new([10, 0, 0, 1].into(), 40_000 + n as u16);
        self.now = if self.next(50) == 0 {
            let back = self.next(1_000) * MS;
            self.now.saturating_sub(back)
        } else {
            self.now + self.next(5_000) * MS
        };
        let now = self.now;
        let step = match self.next(12) {
            0..=6 => {
                let sk = self.next(64);
                Step::Transition(Transition {
                    ts_ns: now,
                    skaddr: sk,
                    family: Family::Ipv4,
                    local: tuple(sk),
                    remote: SERVER.parse().unwrap(),
                    old: TcpState::ALL[self.next(12) as usize],
                    new: TcpState::ALL[self.next(12) as usize],
                    task: Task::new(1, 1, "x"),
                    placement: crate::event::Placement::default(),
                })
            }
            7 | 8 => {
                let n = self.next(64);
                Step::Timewait(TimewaitTimer {
                    ts_ns: now,
                    twaddr: 0x1000 + self.next(16),
                    family: Family::Ipv4,
                    local: tuple(n),
                    remote: SERVER.parse().unwrap(),
                    substate: [FinWait2, TimeWait][self.next(2) as usize],
                    action: [
                        TimerAction::Armed,
                        TimerAction::Fired,
                        TimerAction::Cancelled,
                    ][self.next(3) as usize],
                    expires_ns: now + self.next(70_000) * MS,
                    jiffy_ns: 4 * MS,
                    netns: 0,
                })
            }
            10 => {
                let since = now.saturating_sub(self.next(60_000) * MS);
                Step::InTimeWait(0x1000 + self.next(16), since)
            }
            11 => Step::Gone(0x1000 + self.next(16)),
            _ => {
                let n = self.next(64);
                Step::Existing(ExistingSocket {
                    family: Family::Ipv4,
                    local: tuple(n),
                    remote: SERVER.parse().unwrap(),
                    state: TcpState::ALL[self.next(12) as usize],
                    seen_ns: now,
                    placement: crate::event::Placement::default(),
                })
            }
        };
        (step, self.next(20) == 0)
    }
}

impl Step {
    pub(super) fn feed(&self, c: &mut Correlator, now: u64, out: &mut Vec<Teardown>) {
        match *self {
            Step::Transition(ref t) => c.on_transition(t, out),
            Step::Timewait(ref ev) => c.on_timewait(ev, out),
            Step::Existing(ref s) => c.adopt_existing(s),
            Step::InTimeWait(twaddr, since) => {
                c.timewait_in_time_wait(twaddr, since);
            }
            Step::Gone(twaddr) => c.timewait_gone(twaddr, now, out),
        }
    }
}

impl Correlator {
    /// Checks that no socket is due for a hung report before its table's due time, which
    /// would let the sweep skip it.
    pub(super) fn assert_due_reports_hold(&self) {
        let w = &self.watched;
        let full = self.lives.values().map(|l| l.next_report(w)).min();
        let timewait = self.timewait.values().map(|h| h.next_report(w)).min();
        let existing = self.existing.values().map(|l| l.next_report(w)).min();
        assert!(self.due.full <= full.unwrap_or(u64::MAX), "{:?}", self.due);
        assert!(self.due.timewait <= timewait.unwrap_or(u64::MAX));
        assert!(self.due.existing <= existing.unwrap_or(u64::MAX));
    }
}
