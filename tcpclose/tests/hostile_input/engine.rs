//! The engine ([`Correlator`]) fed hostile streams: impossible state pairs, addresses reused by
//! unrelated sockets, clocks going backwards or jumping, timers of any substate and expiry. It
//! must not panic, must stay under its cap, and what it emits must stay self-consistent.

use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};
use tcpclose::{
    event::{Task, TcpState, TimerAction, TimewaitTimer, Transition},
    hung::{Alert, Thresholds},
    teardown::{Correlator, ExistingSocket, Teardown},
};

use crate::{
    MS, S,
    audit::{Audit, Coverage, Mode},
    config,
    ops::{
        CLOCK_MAX, Case, Expiry, Move, Op, SOCKETS, TIMEWAIT_SOCKETS, TUPLES, Target, case,
        next_states, tuple,
    },
};

/// Turns [`Op`]s into calls into the engine, checked by an [`Audit`] after each: keeps the
/// state each socket address was left in (for [`Move::Follow`]) and the latest handoffs (for
/// [`Target::Handed`]).
pub(crate) struct Stream {
    c: Correlator,
    pub(crate) audit: Audit,
    wild_tuples: bool,
    states: [TcpState; SOCKETS.len()],
    /// `(timewait socket, 4-tuple)` of the latest handoffs, the latest last.
    handed: Vec<(usize, usize)>,
    out: Vec<Teardown>,
    alerts: Vec<Alert>,
}

impl Stream {
    pub(crate) fn new(
        max_sockets: usize,
        thresholds: Thresholds,
        wild_tuples: bool,
        as_run: bool,
    ) -> Self {
        let c = Correlator::watching(max_sockets, thresholds);
        let c = if as_run {
            c.in_kernel_order().without_handshake_ends()
        } else {
            c
        };
        Self {
            c,
            audit: Audit::new(max_sockets, thresholds, wild_tuples),
            wild_tuples,
            states: [TcpState::Close; SOCKETS.len()],
            handed: Vec::new(),
            out: Vec::new(),
            alerts: Vec::new(),
        }
    }

    /// Feeds `op` at `*clock`; the loader's calls move the clock to where it reads it.
    pub(crate) fn feed(&mut self, op: Op, clock: &mut u64) -> Result<(), TestCaseError> {
        let ts = *clock;
        match op {
            Op::Transition {
                sk,
                tuple: n,
                port0,
                step,
                arm,
            } => {
                let (old, new) = match step {
                    Move::Follow(i) => {
                        let next = next_states(self.states[sk]);
                        next[i % next.len()]
                    }
                    Move::Wild(old, new) => (old, new),
                };
                self.states[sk] = new;
                // A kernel socket keeps its 4-tuple, tied here to its address unless wild, and
                // shows local port 0 only in connect()'s CLOSE -> SYN_SENT.
                let (n, port0) = if self.wild_tuples {
                    (n, port0)
                } else {
                    (
                        sk,
                        port0 && (old, new) == (TcpState::Close, TcpState::SynSent),
                    )
                };
                let handoff =
                    new == TcpState::Close && matches!(old, TcpState::FinWait2 | TcpState::Closing);
                if handoff {
                    let tw = arm.map_or(sk % TIMEWAIT_SOCKETS.len(), |(tw, _)| tw);
                    if let Some((tw, orphaned)) = arm {
                        let substate = if orphaned && old == TcpState::FinWait2 {
                            TcpState::FinWait2
                        } else {
                            TcpState::TimeWait
                        };
                        let armed = Op::Timer {
                            target: Target::Pool { tw, tuple: n },
                            substate,
                            action: TimerAction::Armed,
                            expires: Expiry::After(60 * S),
                            jiffy_ns: 4 * MS,
                        };
                        self.feed(armed, clock)?;
                    }
                    self.handed.push((tw, n));
                    if self.handed.len() > 8 {
                        self.handed.remove(0);
                    }
                }
                let (family, local, remote) = tuple(n, port0);
                self.audit.saw_time(ts);
                let t = Transition {
                    ts_ns: ts,
                    skaddr: SOCKETS[sk],
                    family,
                    local,
                    remote,
                    old,
                    new,
                    task: Task::new(4242, 4243, "hostile"),
                    placement: tcpclose::event::Placement::default(),
                };
                self.c.on_transition(&t, &mut self.out);
            }
            Op::Timer {
                target,
                substate,
                action,
                expires,
                jiffy_ns,
            } => {
                let (tw, n) = match target {
                    Target::Pool { tw, tuple } => (tw, tuple),
                    Target::Handed(k) if !self.handed.is_empty() => {
                        self.handed[self.handed.len() - 1 - k % self.handed.len()]
                    }
                    Target::Handed(k) => (k % TIMEWAIT_SOCKETS.len(), k % TUPLES),
                };
                let (family, local, remote) = tuple(n, false);
                let expires_ns = match expires {
                    Expiry::After(ns) => ts.saturating_add(ns),
                    Expiry::Before(ns) => ts.saturating_sub(ns),
                    Expiry::Anywhere(ns) => ns,
                };
                self.audit.saw_time(ts);
                self.audit.saw(expires_ns);
                let ev = TimewaitTimer {
                    ts_ns: ts,
                    twaddr: TIMEWAIT_SOCKETS[tw],
                    family,
                    local,
                    remote,
                    substate,
                    action,
                    expires_ns,
                    jiffy_ns,
                    netns: 0,
                };
                self.c.on_timewait(&ev, &mut self.out);
            }
            Op::Expire { lag_ns } => {
                *clock = self.loader_clock(ts, lag_ns);
                self.audit.saw_time(*clock);
                self.c.expire(*clock, &mut self.out);
            }
            Op::PollHung { lag_ns } => {
                *clock = self.loader_clock(ts, lag_ns);
                self.audit.saw_time(*clock);
                self.c.poll_hung(*clock, &mut self.alerts);
            }
            Op::Adopt {
                tuple: n,
                state,
                age_ns,
            } => {
                let (family, local, remote) = tuple(n, false);
                let seen_ns = ts.saturating_sub(age_ns);
                self.audit.saw_time(seen_ns);
                self.c.adopt_existing(&ExistingSocket {
                    family,
                    local,
                    remote,
                    state,
                    seen_ns,
                    placement: tcpclose::event::Placement::default(),
                });
            }
            Op::InTimeWait { tw, age_ns } => {
                let since_ns = ts.saturating_sub(age_ns);
                self.audit.saw_time(since_ns);
                self.c.timewait_in_time_wait(TIMEWAIT_SOCKETS[tw], since_ns);
            }
            Op::Gone { tw } => {
                self.audit.saw_time(ts);
                self.c
                    .timewait_gone(TIMEWAIT_SOCKETS[tw], ts, &mut self.out);
            }
        }
        self.check()
    }

    /// Where the loader reads its clock: after every event it has drained.
    fn loader_clock(&self, ts: u64, lag_ns: u64) -> u64 {
        if self.audit.mode == Mode::Extreme {
            ts
        } else {
            self.audit.latest.max(ts).saturating_add(lag_ns)
        }
    }

    fn check(&mut self) -> Result<(), TestCaseError> {
        self.audit
            .after_call(&self.c, &mut self.out, &mut self.alerts)
    }

    /// An hour after the latest time seen, what time alone ends has ended, and sock_diag finds
    /// no timewait socket left: only full sockets and start-up sockets remain, each counted once
    /// by state.
    pub(crate) fn drain(&mut self) -> Result<(), TestCaseError> {
        let now = self.audit.highest.max(self.audit.latest);
        let now = now.saturating_add(3_600 * S);
        self.audit.saw_time(now);
        self.c.expire(now, &mut self.out);
        self.check()?;
        for tw in TIMEWAIT_SOCKETS {
            self.c.timewait_gone(tw, now, &mut self.out);
            self.check()?;
        }
        self.c.poll_hung(now, &mut self.alerts);
        self.check()?;
        let counted: u64 = self.c.state_counts().iter().map(|(_, n)| n).sum();
        if self.audit.mode == Mode::Strict {
            prop_assert_eq!(counted, self.c.len() as u64, "sockets left unaccounted for");
        }
        Ok(())
    }
}

/// Feeds `case` to an engine, checking after every call, then drains it.
fn run(case: &Case, mode: Mode) -> Result<Coverage, TestCaseError> {
    let mut stream = Stream::new(
        case.max_sockets,
        case.thresholds,
        case.wild_tuples,
        case.as_run,
    );
    stream.audit.mode = mode;
    let mut clock = case.start_ns.min(CLOCK_MAX);
    for &op in &case.snapshot {
        stream.feed(op, &mut clock)?;
    }
    for &(tick, op) in &case.steps {
        clock = tick.apply(clock);
        stream.feed(op, &mut clock)?;
    }
    stream.drain()?;
    Ok(stream.audit.coverage)
}

proptest! {
    #![proptest_config(config(128))]

    /// Anything at all, for thousands of steps: no panic, the cap holds after every call, and
    /// every teardown and alert is consistent with what was fed.
    #[test]
    fn hostile_streams_keep_the_engine_sound(case in case(8, 1..3_000)) {
        run(&case, Mode::Strict)?;
    }

    /// The clock going backwards often (CPUs' records interleaved in the ring, by microseconds;
    /// hostile input, by hours): no duration comes out of a negative difference, wrapped or
    /// saturated, and every check of the hostile streams holds.
    #[test]
    fn clock_going_backwards_never_makes_up_durations(case in case(40, 1..1_500)) {
        run(&case, Mode::Strict)?;
    }
}

/// The hostile streams reach what the properties above are about: connections seen whole,
/// timewait sockets expiring and killed, hangs reported and resolved. (Counted without checks:
/// this is about the streams, not the engine.)
#[test]
fn hostile_streams_reach_the_engine_paths() {
    let mut runner = TestRunner::deterministic();
    let strategy = case(8, 1_000..1_001);
    let mut total = Coverage::default();
    for _ in 0..16 {
        let case = strategy.new_tree(&mut runner).expect("a case").current();
        total.add(run(&case, Mode::Survey).expect("a survey checks nothing"));
    }
    assert!(
        total.complete > 100
            && total.expired > 10
            && total.killed > 10
            && total.hung > 10
            && total.resolved > 10,
        "{total:?}"
    );
}
