//! Reused addresses, against a model: plausible lives played one after another on a handful of
//! socket addresses, 4-tuples and timewait sockets; the engine must report each connection
//! exactly as the model says.

use proptest::{collection::vec, prelude::*};
use tcpclose::{
    event::{Task, TcpState, TimerAction, TimewaitTimer, Transition},
    hung::Thresholds,
    teardown::{CloseKind, Correlator, Losses, Phase, Phases, Side, Teardown, TimewaitEnd},
};

use crate::{
    MS, S, config,
    ops::{SOCKETS, tuple},
};

/// How a connection of the model ends.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// SYN_SENT/SYN_RECV -> CLOSE.
    Failed,
    /// ESTABLISHED -> CLOSE.
    Reset,
    /// CLOSE_WAIT, LAST_ACK.
    Passive,
    /// FIN_WAIT1, FIN_WAIT2, then a timewait socket: in TIME_WAIT at once, or `orphaned` in
    /// FIN_WAIT2 until the peer's FIN `fin_after` the handoff (none: tcp_fin_timeout, 60 s).
    Active {
        orphaned: bool,
        fin_after: Option<u64>,
    },
    /// FIN_WAIT1, CLOSING, then a timewait socket in TIME_WAIT.
    Simultaneous,
}

/// One connection of a lane, played on the lane's socket address after the previous one's full
/// socket closed.
#[derive(Clone, Copy, Debug)]
struct Conn {
    server: bool,
    script: Script,
    /// After the previous connection's full socket closed.
    gap_ns: u64,
    /// Between its successive state changes.
    steps_ns: [u64; 4],
    /// An RST kills its timewait socket this long after the handoff.
    killed_after: Option<u64>,
    /// The kernel detaches a timer before it fires it (`expire_timers()`): a cancel comes
    /// first, at the same time.
    cancel_before_firing: bool,
    /// The peer's FIN moves the orphan's timer to another bucket: cancel, then arm.
    moved: bool,
    /// The timewait socket is armed after the full socket's `-> CLOSE` rather than before.
    armed_after_close: bool,
}

fn conn() -> impl Strategy<Value = Conn> {
    let script = prop_oneof![
        1 => Just(Script::Failed),
        1 => Just(Script::Reset),
        2 => Just(Script::Passive),
        4 => (any::<bool>(), prop::option::of(MS..59 * S))
            .prop_map(|(orphaned, fin_after)| Script::Active { orphaned, fin_after }),
        1 => Just(Script::Simultaneous),
    ];
    (
        any::<bool>(),
        script,
        prop_oneof![Just(0), MS..3 * S, 60 * S..90 * S],
        [MS..5 * S, MS..5 * S, MS..5 * S, MS..5 * S],
        prop::option::weighted(0.3, MS..70 * S),
        any::<[bool; 3]>(),
    )
        .prop_map(
            |(server, script, gap_ns, steps_ns, killed_after, flags)| Conn {
                server,
                script,
                gap_ns,
                steps_ns,
                killed_after,
                cancel_before_firing: flags[0],
                moved: flags[1],
                armed_after_close: flags[2],
            },
        )
}

/// The timewait sockets of each lane: two, the second at a full socket address of another lane
/// (the engine keeps full and timewait sockets in separate tables).
const LANE_TIMEWAIT_SOCKETS: [[u64; 2]; 3] = [
    [0xffff_8881_0000_1000, SOCKETS[1]],
    [0xffff_8881_0000_2000, SOCKETS[2]],
    [0xffff_8881_0000_3000, SOCKETS[0]],
];

/// An event of the model, in the order it comes: by time, then lane, then within its lane.
struct Event {
    ts_ns: u64,
    lane: usize,
    seq: usize,
    what: What,
}

enum What {
    Transition(Transition),
    Timer(TimewaitTimer),
}

/// A connection's timewait socket while it lives, and what the engine must report of it.
struct LiveTimewait {
    twaddr: u64,
    tuple: usize,
    /// Its teardown as the full socket left it; the end and the timewait phases to come.
    teardown: Teardown,
    handoff_ns: u64,
    /// Orphaned in FIN_WAIT2, until the peer's FIN at this time (if before its end).
    orphaned: Option<Option<u64>>,
    teardown_start_ns: u64,
    born_ns: u64,
    /// When and how it ends unless a new connection on its 4-tuple kills it first.
    end: (u64, TimewaitEnd),
    cancel_before_firing: bool,
    moved: bool,
}

/// Plays the lanes: each lane's connections one after another on the lane's one socket
/// address, its two 4-tuples and two timewait socket addresses taken in turn. So a socket
/// address is reused by the next connection as soon as the previous one's full socket closed
/// (while its timewait socket lives on), and a 4-tuple and a timewait address by the one after
/// (killing its timewait socket if still there, as connect() and a SYN to a TIME_WAIT socket
/// do). Returns the events, in order, and the teardowns the engine must report.
fn play(lanes: &[(u64, Vec<Conn>)]) -> (Vec<Event>, Vec<Teardown>) {
    let mut events = Vec::new();
    let mut expected = Vec::new();
    let mut id = 0;
    for (lane, (start_ns, conns)) in lanes.iter().enumerate() {
        let mut push = |ts_ns: u64, what: What| {
            let seq = events.len();
            events.push(Event {
                ts_ns,
                lane,
                seq,
                what,
            })
        };
        let mut live: [Option<LiveTimewait>; 2] = [None, None];
        let mut closed_ns = *start_ns;
        for (j, conn) in conns.iter().enumerate() {
            id += 1;
            let turn = j % 2;
            let n = 2 * lane + turn;
            let (family, local, remote) = tuple(n, false);
            let task = Task::new(id, id, "conn");
            let s = closed_ns + conn.gap_ns;
            // The previous connection on this 4-tuple: killed by this one if still there.
            if let Some(tw) = live[turn].take() {
                end_timewait(tw, s, &mut push, &mut expected);
            }
            let mut ts = s;
            let step = |old, new, ts: u64, push: &mut dyn FnMut(u64, What)| {
                // connect() reports CLOSE -> SYN_SENT before it picks the local port.
                let port0 = (old, new) == (TcpState::Close, TcpState::SynSent);
                let t = Transition {
                    ts_ns: ts,
                    skaddr: SOCKETS[lane],
                    family,
                    local: tuple(n, port0).1,
                    remote,
                    old,
                    new,
                    task,
                    placement: tcpclose::event::Placement::default(),
                };
                push(ts, What::Transition(t));
            };
            use TcpState::*;
            let (side, opening) = if conn.server {
                (Side::Server, (Listen, SynRecv))
            } else {
                (Side::Client, (Close, SynSent))
            };
            step(opening.0, opening.1, ts, &mut push);
            let born_ns = ts;
            let d = conn.steps_ns;
            ts += d[0];
            let mut teardown = Teardown {
                end_ns: 0,
                family,
                local,
                remote,
                side: Some(side),
                close: CloseKind::Failed,
                phases: Phases::default(),
                teardown_ns: None,
                lifetime_ns: None,
                complete: true,
                // Every transition below made by a system call reveals the owner.
                owner: (!conn.server).then_some(task),
                resolution_ns: None,
                timewait_end: None,
                placement: tcpclose::event::Placement::default(),
                reset: None,
                fin_retransmits: Default::default(),
            };
            if let Script::Failed = conn.script {
                step(opening.1, Close, ts, &mut push);
                teardown.end_ns = ts;
                teardown.lifetime_ns = Some(ts - born_ns);
                expected.push(teardown);
                closed_ns = ts;
                continue;
            }
            step(opening.1, Established, ts, &mut push);
            ts += d[1];
            let a = ts;
            match conn.script {
                Script::Failed => unreachable!(),
                Script::Reset => {
                    step(Established, Close, a, &mut push);
                    teardown.close = CloseKind::Reset;
                    teardown.end_ns = a;
                    teardown.teardown_ns = Some(0);
                    teardown.lifetime_ns = Some(a - born_ns);
                    expected.push(teardown);
                    closed_ns = a;
                }
                Script::Passive => {
                    step(Established, CloseWait, a, &mut push);
                    let b = a + d[2];
                    step(CloseWait, LastAck, b, &mut push);
                    let e = b + d[3];
                    step(LastAck, Close, e, &mut push);
                    teardown.close = CloseKind::Passive;
                    teardown.owner = Some(task);
                    teardown.phases.add(Phase::CloseWait, b - a);
                    teardown.phases.add(Phase::LastAck, e - b);
                    teardown.end_ns = e;
                    teardown.teardown_ns = Some(e - a);
                    teardown.lifetime_ns = Some(e - born_ns);
                    expected.push(teardown);
                    closed_ns = e;
                }
                Script::Active { .. } | Script::Simultaneous => {
                    step(Established, FinWait1, a, &mut push);
                    teardown.owner = Some(task);
                    let b = a + d[2];
                    let c = b + d[3];
                    let (closing, orphaned) = match conn.script {
                        Script::Active {
                            orphaned,
                            fin_after,
                        } => {
                            teardown.close = CloseKind::Active;
                            teardown.phases.add(Phase::FinWait2, c - b);
                            (FinWait2, orphaned.then_some(fin_after.map(|f| c + f)))
                        }
                        _ => {
                            teardown.close = CloseKind::Simultaneous;
                            teardown.phases.add(Phase::Closing, c - b);
                            (Closing, None)
                        }
                    };
                    teardown.phases.add(Phase::FinWait1, b - a);
                    step(FinWait1, closing, b, &mut push);
                    let tw = LANE_TIMEWAIT_SOCKETS[lane][turn];
                    let substate = if orphaned.is_some() {
                        FinWait2
                    } else {
                        TimeWait
                    };
                    let armed = What::Timer(TimewaitTimer {
                        ts_ns: c,
                        twaddr: tw,
                        family,
                        local,
                        remote,
                        substate,
                        action: TimerAction::Armed,
                        expires_ns: c + 60 * S,
                        jiffy_ns: 4 * MS,
                        netns: 0,
                    });
                    if conn.armed_after_close {
                        step(closing, Close, c, &mut push);
                        push(c, armed);
                    } else {
                        push(c, armed);
                        step(closing, Close, c, &mut push);
                    }
                    // TIME_WAIT, and an orphan's FIN_WAIT2 (tcp_fin_timeout), last 60 s.
                    let natural = match orphaned {
                        Some(Some(fin)) => fin + 60 * S,
                        _ => c + 60 * S,
                    };
                    let end = match conn.killed_after {
                        Some(k) if c + k < natural => (c + k, TimewaitEnd::Killed),
                        _ => (natural, TimewaitEnd::Expired),
                    };
                    live[turn] = Some(LiveTimewait {
                        twaddr: tw,
                        tuple: n,
                        teardown,
                        handoff_ns: c,
                        orphaned,
                        teardown_start_ns: a,
                        born_ns,
                        end,
                        cancel_before_firing: conn.cancel_before_firing,
                        moved: conn.moved,
                    });
                    closed_ns = c;
                }
            }
        }
        for tw in live.into_iter().flatten() {
            end_timewait(tw, u64::MAX, &mut push, &mut expected);
        }
    }
    events.sort_by_key(|e| (e.ts_ns, e.lane, e.seq));
    (events, expected)
}

/// Plays the rest of a timewait socket's life: killed at `reused_ns` by a new connection on its
/// 4-tuple, if it is still there then.
fn end_timewait(
    tw: LiveTimewait,
    reused_ns: u64,
    push: &mut dyn FnMut(u64, What),
    expected: &mut Vec<Teardown>,
) {
    let (end_ns, how) = if reused_ns < tw.end.0 {
        (reused_ns, TimewaitEnd::Killed)
    } else {
        tw.end
    };
    let (family, local, remote) = tuple(tw.tuple, false);
    let timer = |ts_ns, substate, action, expires_ns| {
        What::Timer(TimewaitTimer {
            ts_ns,
            twaddr: tw.twaddr,
            family,
            local,
            remote,
            substate,
            action,
            expires_ns,
            jiffy_ns: 4 * MS,
            netns: 0,
        })
    };
    let mut t = tw.teardown;
    let c = tw.handoff_ns;
    // The peer's FIN to an orphan, if it comes before the end: TIME_WAIT from then on.
    let fin = tw.orphaned.flatten().filter(|&f| f < end_ns);
    let (substate, expires_ns) = match (tw.orphaned, fin) {
        (Some(_), Some(f)) => {
            if tw.moved {
                push(
                    f,
                    timer(f, TcpState::TimeWait, TimerAction::Cancelled, c + 60 * S),
                );
            }
            push(
                f,
                timer(f, TcpState::TimeWait, TimerAction::Armed, f + 60 * S),
            );
            t.phases.add(Phase::FinWait2, f - c);
            t.phases.add(Phase::TimeWait, end_ns - f);
            (TcpState::TimeWait, f + 60 * S)
        }
        (Some(_), None) => {
            t.phases.add(Phase::FinWait2, end_ns - c);
            if how == TimewaitEnd::Expired {
                t.close = CloseKind::FinTimeout;
            }
            (TcpState::FinWait2, c + 60 * S)
        }
        (None, _) => {
            t.phases.add(Phase::TimeWait, end_ns - c);
            (TcpState::TimeWait, c + 60 * S)
        }
    };
    match how {
        TimewaitEnd::Expired => {
            if tw.cancel_before_firing {
                push(
                    end_ns,
                    timer(end_ns, substate, TimerAction::Cancelled, expires_ns),
                );
            }
            push(
                end_ns,
                timer(end_ns, substate, TimerAction::Fired, expires_ns),
            );
        }
        TimewaitEnd::Killed => {
            push(
                end_ns,
                timer(end_ns, substate, TimerAction::Cancelled, expires_ns),
            );
        }
    }
    t.end_ns = end_ns;
    t.teardown_ns = Some(end_ns - tw.teardown_start_ns);
    t.lifetime_ns = Some(end_ns - tw.born_ns);
    t.timewait_end = Some(how);
    expected.push(t);
}

/// Teardowns as a sorted list of their `Debug` forms: the engine's order of emission across
/// sockets is its own business.
fn sorted(teardowns: &[Teardown]) -> Vec<String> {
    let mut v: Vec<String> = teardowns.iter().map(|t| format!("{t:?}")).collect();
    v.sort();
    v
}

proptest! {
    #![proptest_config(config(256))]

    /// Socket addresses, 4-tuples and timewait socket addresses reused by one connection after
    /// another, at once and while the previous connection's timewait socket lives on (up to
    /// killing it): every connection is reported exactly once, exactly as the model played it,
    /// with nothing inherited from the previous user of an address, nothing lost, nothing left.
    #[test]
    fn reused_addresses_never_mix_connections(
        lanes in vec((0..S, vec(conn(), 1..12)), 1..=3),
        loader_ticks in vec(prop::bool::weighted(0.2), 1..64),
    ) {
        let (events, expected) = play(&lanes);
        let mut c = Correlator::watching(1024, Thresholds::DEFAULT);
        let (mut out, mut alerts) = (Vec::new(), Vec::new());
        for (i, e) in events.iter().enumerate() {
            match &e.what {
                What::Transition(t) => c.on_transition(t, &mut out),
                What::Timer(ev) => c.on_timewait(ev, &mut out),
            }
            // The loader's passes, at its clock (no earlier than what it drained).
            if loader_ticks[i % loader_ticks.len()] {
                c.expire(e.ts_ns, &mut out);
                c.poll_hung(e.ts_ns, &mut alerts);
            }
        }
        let last = events.last().map_or(0, |e| e.ts_ns);
        c.expire(last + 3_600 * S, &mut out);
        c.poll_hung(last + 3_600 * S, &mut alerts);
        prop_assert_eq!(sorted(&out), sorted(&expected));
        // No phase of the model comes near the default thresholds.
        prop_assert!(alerts.is_empty(), "{:?}", alerts);
        prop_assert_eq!(c.losses(), Losses::default());
        prop_assert!(c.is_empty(), "{} sockets left", c.len());
    }
}
