//! What the hostile streams fed to the engine are made of: a few kernel addresses and 4-tuples,
//! reused by unrelated sockets; the clock's moves; the operations (transitions, timers, the
//! loader's calls, start-up sockets, sock_diag answers); and the strategies that draw them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::{collection::vec, prelude::*, sample::select};
use tcpclose::{
    event::{Family, TcpState, TimerAction},
    hung::Thresholds,
    teardown::Phase,
};

use crate::{MS, S, decoder::jiffy_ns};

/// Kernel addresses of full sockets: a few, so that they are reused by unrelated sockets. The
/// extremes are no sentinel to the engine.
pub(crate) const SOCKETS: [u64; 8] = [
    0xffff_8880_0000_1000,
    0xffff_8880_0000_2000,
    0xffff_8880_0000_3000,
    0xffff_8880_0000_4000,
    0xffff_8880_0000_5000,
    0xffff_8880_0000_6000,
    0,
    u64::MAX,
];

/// Kernel addresses of timewait sockets: fewer still, and two shared with full sockets (the
/// engine keeps them in separate tables, and must not mix them up).
pub(crate) const TIMEWAIT_SOCKETS: [u64; 4] = [
    0xffff_8881_0000_1000,
    0xffff_8881_0000_2000,
    0xffff_8880_0000_1000,
    u64::MAX,
];

/// 4-tuples: IPv4, IPv6 and IPv4-mapped IPv6 (a different 4-tuple to the engine than the plain
/// IPv4 one it maps). Each may also be seen with local port 0, as `connect()` reports
/// CLOSE -> SYN_SENT before it picks the port.
pub(crate) fn tuple(n: usize, port0: bool) -> (Family, SocketAddr, SocketAddr) {
    let v4 = |a: [u8; 4]| IpAddr::V4(a.into());
    let mapped = |a: [u8; 4]| IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped());
    let v6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last));
    let port = 40_000 + (n % 2) as u16;
    let (family, local, remote) = match n % TUPLES / 2 {
        0 => (
            Family::Ipv4,
            (v4([10, 0, 0, 1]), port),
            (v4([10, 0, 0, 2]), 80),
        ),
        1 => (Family::Ipv6, (v6(1), port), (v6(2), 443)),
        _ => (
            Family::Ipv6,
            (mapped([10, 0, 0, 1]), port),
            (mapped([10, 0, 0, 2]), 80),
        ),
    };
    let port = if port0 { 0 } else { local.1 };
    (
        family,
        SocketAddr::new(local.0, port),
        SocketAddr::new(remote.0, remote.1),
    )
}

pub(crate) const TUPLES: usize = 6;

/// Where the timestamps fed to the engine stay: CLOCK_MONOTONIC does not reach 2^62 ns (146
/// years), and the engine keeps `u64::MAX` as "unknown" (see [`crate::extreme_timestamps`] for
/// beyond).
pub(crate) const CLOCK_MAX: u64 = 1 << 62;

/// How the kernel's clock moves before a step: mostly forward, sometimes backwards (records of
/// different CPUs, or hostile input), sometimes far.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Tick {
    Same,
    Forward(u64),
    Back(u64),
    Jump(u64),
}

impl Tick {
    pub(crate) fn apply(self, clock: u64) -> u64 {
        match self {
            Tick::Same => clock,
            Tick::Forward(ns) | Tick::Jump(ns) => clock.saturating_add(ns).min(CLOCK_MAX),
            Tick::Back(ns) => clock.saturating_sub(ns),
        }
    }
}

/// `back_weight` out of 100 ticks go backwards.
fn tick(back_weight: u32) -> impl Strategy<Value = Tick> {
    prop_oneof![
        10 => Just(Tick::Same),
        90u32.saturating_sub(back_weight).max(1) => (0..5 * S).prop_map(Tick::Forward),
        back_weight.max(1) => prop_oneof![
            // A few microseconds (CPUs' records interleaved), up to seconds, or far.
            (0..100_000u64).prop_map(Tick::Back),
            (0..2 * S).prop_map(Tick::Back),
            (0..1u64 << 45).prop_map(Tick::Back),
        ],
        3 => prop_oneof![(5 * S..3_600 * S), (0..1u64 << 50)].prop_map(Tick::Jump),
    ]
}

/// When a timewait socket's timer is due, relative to the event's time.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Expiry {
    /// `ns` after the event (60 s for TIME_WAIT, tcp_fin_timeout for FIN_WAIT2).
    After(u64),
    /// `ns` before the event (a timer that fired late, or nonsense).
    Before(u64),
    /// Any time at all: whatever the decoder made of hostile `jiffies` and `expires`.
    Anywhere(u64),
}

/// Which state change a transition makes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Move {
    /// The socket's next step as TCP would take it from the state the stream last left it in
    /// (the `n`th of the possible ones): a birth from CLOSE, a teardown, a reset. Lives that
    /// hold together reach the engine's deeper paths (handoffs, timed phases, hangs).
    Follow(usize),
    /// Any pair at all, possible or not, consistent with the stream or not: a lost event, a
    /// reused address, hostile input.
    Wild(TcpState, TcpState),
}

/// A timer event's timewait socket and 4-tuple.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// Any from the pools.
    Pool { tw: usize, tuple: usize },
    /// The timewait socket of the `k`th latest handoff of the stream, when there was one.
    Handed(usize),
}

/// One call into the engine. Indexes select from the pools above.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Transition {
        sk: usize,
        tuple: usize,
        port0: bool,
        step: Move,
        /// When the step hands the socket to a timewait socket (FIN_WAIT2 or CLOSING ->
        /// CLOSE), the timewait socket `tw` is armed just before, as tcp_time_wait() does:
        /// in FIN_WAIT2 (orphaned) or TIME_WAIT.
        arm: Option<(usize, bool)>,
    },
    Timer {
        target: Target,
        substate: TcpState,
        action: TimerAction,
        expires: Expiry,
        jiffy_ns: u64,
    },
    /// `expire` and `poll_hung` as the loader calls them, at its clock: `lag_ns` after the
    /// latest time the engine has seen (the loader reads the clock after draining the ring).
    Expire {
        lag_ns: u64,
    },
    PollHung {
        lag_ns: u64,
    },
    /// A socket found at start-up in `state`, seen `age_ns` ago.
    Adopt {
        tuple: usize,
        state: TcpState,
        age_ns: u64,
    },
    /// sock_diag: the timewait socket is in TIME_WAIT since `age_ns` ago.
    InTimeWait {
        tw: usize,
        age_ns: u64,
    },
    /// sock_diag: the timewait socket is gone.
    Gone {
        tw: usize,
    },
}

/// The state changes TCP makes from `state` (a socket in CLOSE is born: connect() or a
/// listener's child).
pub(crate) fn next_states(state: TcpState) -> &'static [(TcpState, TcpState)] {
    use TcpState::*;
    match state {
        Close => &[(Close, SynSent), (Close, SynSent), (Listen, SynRecv)],
        SynSent => &[
            (SynSent, Established),
            (SynSent, Established),
            (SynSent, Close),
        ],
        SynRecv => &[
            (SynRecv, Established),
            (SynRecv, Established),
            (SynRecv, Close),
        ],
        Established => &[
            (Established, FinWait1),
            (Established, CloseWait),
            (Established, Close),
        ],
        FinWait1 => &[(FinWait1, FinWait2), (FinWait1, Closing), (FinWait1, Close)],
        FinWait2 => &[(FinWait2, Close)],
        Closing => &[(Closing, Close)],
        CloseWait => &[(CloseWait, LastAck), (CloseWait, Close)],
        LastAck => &[(LastAck, Close)],
        TimeWait => &[(TimeWait, Close)],
        Listen => &[(Listen, Close)],
        NewSynRecv => &[(NewSynRecv, Close)],
    }
}

fn any_state() -> impl Strategy<Value = TcpState> {
    select(TcpState::ALL.to_vec())
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    let step = prop_oneof![
        4 => (0..6usize).prop_map(Move::Follow),
        1 => (any_state(), any_state()).prop_map(|(old, new)| Move::Wild(old, new)),
    ];
    let transition = (
        0..SOCKETS.len(),
        0..TUPLES,
        prop::bool::weighted(0.3),
        step,
        prop::option::weighted(0.7, (0..TIMEWAIT_SOCKETS.len(), any::<bool>())),
    )
        .prop_map(|(sk, tuple, port0, step, arm)| Op::Transition {
            sk,
            tuple,
            port0,
            step,
            arm,
        });
    let target = prop_oneof![
        1 => (0..TIMEWAIT_SOCKETS.len(), 0..TUPLES).prop_map(|(tw, tuple)| Target::Pool { tw, tuple }),
        2 => (0..4usize).prop_map(Target::Handed),
    ];
    // Timers mostly in the substates the kernel uses, sometimes in any.
    let substate = prop_oneof![
        4 => select(vec![TcpState::FinWait2, TcpState::TimeWait]),
        1 => any_state(),
    ];
    let action = select(vec![
        TimerAction::Armed,
        TimerAction::Fired,
        TimerAction::Cancelled,
    ]);
    let expires = prop_oneof![
        4 => prop_oneof![Just(60 * S), 0..120 * S].prop_map(Expiry::After),
        1 => (0..120 * S).prop_map(Expiry::Before),
        1 => any::<u64>().prop_map(Expiry::Anywhere),
    ];
    let timer = (target, substate, action, expires, jiffy_ns()).prop_map(
        |(target, substate, action, expires, jiffy_ns)| Op::Timer {
            target,
            substate,
            action,
            expires,
            jiffy_ns,
        },
    );
    let lag = prop_oneof![Just(0), 0..3 * S];
    prop_oneof![
        40 => transition,
        15 => timer,
        6 => lag.clone().prop_map(|lag_ns| Op::Expire { lag_ns }),
        6 => lag.prop_map(|lag_ns| Op::PollHung { lag_ns }),
        3 => adopt(),
        2 => (0..TIMEWAIT_SOCKETS.len(), 0..120 * S)
            .prop_map(|(tw, age_ns)| Op::InTimeWait { tw, age_ns }),
        2 => (0..TIMEWAIT_SOCKETS.len()).prop_map(|tw| Op::Gone { tw }),
    ]
}

/// A socket found at start-up: mostly in a teardown phase (the others are not followed).
fn adopt() -> impl Strategy<Value = Op> {
    let state = prop_oneof![
        3 => select(Phase::ALL.map(Phase::state).to_vec()),
        1 => any_state(),
    ];
    (0..TUPLES, state, 0..200 * S).prop_map(|(tuple, state, age_ns)| Op::Adopt {
        tuple,
        state,
        age_ns,
    })
}

/// Hung thresholds: none, the defaults, or short ones (a second or so) on any phases, so that
/// sockets hang often within a case.
pub(crate) fn thresholds() -> impl Strategy<Value = Thresholds> {
    let short = vec(prop::option::of(200 * MS..10 * S), Phase::ALL.len()).prop_map(|ns| {
        let mut t = Thresholds::NONE;
        for (phase, ns) in Phase::ALL.into_iter().zip(ns) {
            t.set(phase, ns);
        }
        t
    });
    prop_oneof![
        1 => Just(Thresholds::NONE),
        1 => Just(Thresholds::DEFAULT),
        3 => short,
    ]
}

/// One engine run.
#[derive(Clone, Debug)]
pub(crate) struct Case {
    pub(crate) max_sockets: usize,
    pub(crate) thresholds: Thresholds,
    /// Transitions take any 4-tuple from the pool. Otherwise each full socket address keeps
    /// its own (as a kernel socket does), so that alerts can be matched by 4-tuple.
    pub(crate) wild_tuples: bool,
    /// The engine configured as tcpclose runs it: timer events taken in the kernel's order, the
    /// handshakes' ends left out (see `Correlator::in_kernel_order`, `without_handshake_ends`).
    pub(crate) as_run: bool,
    /// The clock at the start.
    pub(crate) start_ns: u64,
    /// Sockets the start-up snapshot finds (as [`Op::Adopt`]s), before any event.
    pub(crate) snapshot: Vec<Op>,
    pub(crate) steps: Vec<(Tick, Op)>,
}

pub(crate) fn case(back_weight: u32, steps: std::ops::Range<usize>) -> impl Strategy<Value = Case> {
    (
        1..40usize,
        thresholds(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(0), 0..1u64 << 40],
        vec(adopt(), 0..12),
        vec((tick(back_weight), op()), steps),
    )
        .prop_map(
            |(max_sockets, thresholds, wild_tuples, as_run, start_ns, snapshot, steps)| Case {
                max_sockets,
                thresholds,
                wild_tuples,
                as_run,
                start_ns,
                snapshot,
                steps,
            },
        )
}
