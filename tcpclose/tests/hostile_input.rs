//! Hostile input: property-based fuzzing of the two places where outside data enters tcpclose.
//!
//! - The decoder ([`Record::decode`]) turns whatever bytes the ring buffer holds into records.
//!   Checked against a specification written here from the ABI's field offsets: every buffer is
//!   either decoded into exactly the fields it holds or refused for a defect it really has.
//! - The correlation engine ([`Correlator`]) follows sockets through their teardown. Fed
//!   arbitrary streams (impossible state pairs, addresses reused by unrelated sockets, clocks
//!   going backwards or jumping, timers of any substate and expiry), it must not panic, must stay
//!   under its cap, and what it emits must stay self-consistent. Fed plausible lives on a handful
//!   of reused addresses, it must report each connection exactly as a model of it says.
//!
//! Failures found by proptest are persisted in `tcpclose/proptest-regressions/hostile_input.txt`
//! (to be committed, so that every run replays them first); failures that were engine bugs are
//! also kept below as plain, named regression tests with the minimized sequence.
//!
//! Run longer with e.g. `PROPTEST_CASES=5000 cargo test --release -p tcpclose --test
//! hostile_input`.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use proptest::{
    collection::vec,
    prelude::*,
    sample::select,
    strategy::ValueTree,
    test_runner::{FileFailurePersistence, TestCaseError, TestRunner},
};
use tcpclose::{
    event::{DecodeError, Family, Record, Task, TcpState, TimerAction, TimewaitTimer, Transition},
    hung::{Alert, AlertKind, Thresholds},
    teardown::{
        CloseKind, Correlator, ExistingSocket, Losses, Phase, Phases, Side, Teardown, TimewaitEnd,
    },
};
use tcpclose_common::{
    AF_INET, AF_INET6, TIMEWAIT_EVENT_SIZE, TRANSITION_EVENT_SIZE, TimewaitEvent, TransitionEvent,
    record_kind, timer_action,
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000 * MS;

/// Where proptest keeps the seeds of the failures it found, replayed before new cases. The
/// default (`SourceParallel`) looks for a `lib.rs` next to the test file, which an integration
/// test does not have, and would fall back to a file beside this one: named explicitly instead.
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/hostile_input.txt"
);

/// `cases` per property unless `PROPTEST_CASES` asks for more (or fewer): the defaults keep the
/// whole file to a few seconds in release on two cores.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        // Engine cases run thousands of steps: bound the minimization of a failure rather than
        // let it run for hours (a bounded one is still replayed from its persisted seed).
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// The decoder
// ------------------------------------------------------------------------------------------------

/// The bytes of an ABI struct, as the kernel program writes them into the ring buffer.
fn abi_bytes<T: aya::Pod>(raw: &T) -> Vec<u8> {
    tcpclose_common::record_bytes::of(raw).to_vec()
}

/// Reads `N` bytes at `at`: the ABI's fields, by offset, independently of the structs' layout.
fn at<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    bytes[at..at + N].try_into().expect("in bounds")
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_ne_bytes(at(bytes, offset))
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes(at(bytes, offset))
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_ne_bytes(at(bytes, offset))
}

/// What a transition or timewait record says, as this specification reads it.
#[derive(Debug, PartialEq, Eq)]
enum Expected {
    Transition {
        ts_ns: u64,
        skaddr: u64,
        family: Family,
        local: SocketAddr,
        remote: SocketAddr,
        old: TcpState,
        new: TcpState,
        pid: u32,
        tid: u32,
        comm: String,
    },
    Timewait(TimewaitTimer),
}

/// The address family and two ends from a record's raw fields, or the defect.
fn spec_endpoints(
    family: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
) -> Result<(Family, SocketAddr, SocketAddr), DecodeError> {
    // An IPv4 address is the first 4 bytes; the rest is not looked at.
    let v4 = |a: [u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
    let v6 = |a: [u8; 16]| IpAddr::V6(Ipv6Addr::from(a));
    match family {
        AF_INET => Ok((
            Family::Ipv4,
            SocketAddr::new(v4(saddr), sport),
            SocketAddr::new(v4(daddr), dport),
        )),
        AF_INET6 => Ok((
            Family::Ipv6,
            SocketAddr::new(v6(saddr), sport),
            SocketAddr::new(v6(daddr), dport),
        )),
        other => Err(DecodeError::UnknownFamily(other)),
    }
}

fn spec_state(n: i32) -> Result<TcpState, DecodeError> {
    TcpState::ALL
        .into_iter()
        .find(|s| *s as i32 == n)
        .ok_or(DecodeError::UnknownState(n))
}

/// The specification of [`Record::decode`]: `Ok` with what the record says, or every defect it
/// has (the decoder may report any one of them).
fn spec_decode(bytes: &[u8], jiffy_ns: u64) -> Result<Expected, Vec<DecodeError>> {
    match bytes.first().copied() {
        None => Err(vec![DecodeError::Length(0)]),
        Some(record_kind::TRANSITION) if bytes.len() == TRANSITION_EVENT_SIZE => {
            spec_transition(bytes)
        }
        Some(record_kind::TIMEWAIT) if bytes.len() == TIMEWAIT_EVENT_SIZE => {
            spec_timewait(bytes, jiffy_ns)
        }
        Some(record_kind::TRANSITION | record_kind::TIMEWAIT) => {
            Err(vec![DecodeError::Length(bytes.len())])
        }
        Some(kind) => Err(vec![DecodeError::UnknownKind(kind)]),
    }
}

/// `TransitionEvent`: kind 0, _pad 1, family 2, sport 4, dport 6, ts_ns 8, skaddr 16, saddr 24,
/// daddr 40, tid 56, tgid 60, oldstate 64, newstate 68, comm 72.
fn spec_transition(b: &[u8]) -> Result<Expected, Vec<DecodeError>> {
    let ends = spec_endpoints(
        u16_at(b, 2),
        at(b, 24),
        at(b, 40),
        u16_at(b, 4),
        u16_at(b, 6),
    );
    let old = spec_state(i32::from_ne_bytes(at(b, 64)));
    let new = spec_state(i32::from_ne_bytes(at(b, 68)));
    match (ends, old, new) {
        (Ok((family, local, remote)), Ok(old), Ok(new)) => {
            let comm: [u8; 16] = at(b, 72);
            let len = comm.iter().position(|&c| c == 0).unwrap_or(16);
            Ok(Expected::Transition {
                ts_ns: u64_at(b, 8),
                skaddr: u64_at(b, 16),
                family,
                local,
                remote,
                old,
                new,
                pid: u32_at(b, 60),
                tid: u32_at(b, 56),
                comm: String::from_utf8_lossy(&comm[..len]).into_owned(),
            })
        }
        (ends, old, new) => Err([ends.err(), old.err(), new.err()]
            .into_iter()
            .flatten()
            .collect()),
    }
}

/// `TimewaitEvent`: kind 0, action 1, family 2, sport 4, dport 6, substate 8, _pad 9, ts_ns 16,
/// jiffies 24, twaddr 32, expires 40, saddr 48, daddr 64.
fn spec_timewait(b: &[u8], jiffy_ns: u64) -> Result<Expected, Vec<DecodeError>> {
    let ends = spec_endpoints(
        u16_at(b, 2),
        at(b, 48),
        at(b, 64),
        u16_at(b, 4),
        u16_at(b, 6),
    );
    let action = match b[1] {
        timer_action::START => Ok(TimerAction::Armed),
        timer_action::EXPIRE => Ok(TimerAction::Fired),
        timer_action::CANCEL => Ok(TimerAction::Cancelled),
        other => Err(DecodeError::UnknownTimerAction(other)),
    };
    let substate = spec_state(i32::from(b[8]));
    match (ends, action, substate) {
        (Ok((family, local, remote)), Ok(action), Ok(substate)) => {
            let ts_ns = u64_at(b, 16);
            // `jiffies` and `expires` are wrapping counters: the expiry is their signed distance
            // from `ts_ns`, in jiffies, clamped to the u64 nanoseconds.
            let ahead = u64_at(b, 40).wrapping_sub(u64_at(b, 24)) as i64;
            let expires = i128::from(ts_ns) + i128::from(ahead) * i128::from(jiffy_ns);
            Ok(Expected::Timewait(TimewaitTimer {
                ts_ns,
                twaddr: u64_at(b, 32),
                family,
                local,
                remote,
                substate,
                action,
                expires_ns: expires.clamp(0, i128::from(u64::MAX)) as u64,
                jiffy_ns,
            }))
        }
        (ends, action, substate) => Err([ends.err(), action.err(), substate.err()]
            .into_iter()
            .flatten()
            .collect()),
    }
}

/// What the decoder made of a record, in the specification's terms.
fn as_expected(record: Record) -> Expected {
    match record {
        Record::Transition(t) => Expected::Transition {
            ts_ns: t.ts_ns,
            skaddr: t.skaddr,
            family: t.family,
            local: t.local,
            remote: t.remote,
            old: t.old,
            new: t.new,
            pid: t.task.pid,
            tid: t.task.tid,
            comm: t.task.comm().into_owned(),
        },
        Record::Timewait(ev) => Expected::Timewait(ev),
    }
}

/// The decoder agrees with the specification on `bytes`.
fn check_decode(bytes: &[u8], jiffy_ns: u64) -> Result<(), TestCaseError> {
    let got = Record::decode(bytes, jiffy_ns);
    match (spec_decode(bytes, jiffy_ns), got) {
        (Ok(expected), Ok(record)) => prop_assert_eq!(expected, as_expected(record)),
        (Err(defects), Err(e)) => prop_assert!(
            defects.contains(&e),
            "refused for {e:?}, which is not among its defects {defects:?}"
        ),
        (spec, got) => prop_assert!(false, "specified {spec:?}, decoded {got:?}"),
    }
    Ok(())
}

/// Jiffies of real kernels (HZ 1000, 250, 100) and any other value.
fn jiffy_ns() -> impl Strategy<Value = u64> {
    prop_oneof![Just(MS), Just(4 * MS), Just(10 * MS), Just(0), any::<u64>()]
}

/// A `TCP_*` state number the decoder knows.
fn state_number() -> impl Strategy<Value = i32> {
    1..=12i32
}

/// `AF_INET` or `AF_INET6`.
fn family_number() -> impl Strategy<Value = u16> {
    prop_oneof![Just(AF_INET), Just(AF_INET6)]
}

prop_compose! {
    /// A valid transition record, built as the kernel program builds it: any field values, but
    /// a known family and states.
    fn transition_event()(
        family in family_number(),
        (sport, dport) in any::<(u16, u16)>(),
        (ts_ns, skaddr) in any::<(u64, u64)>(),
        (saddr, daddr) in any::<([u8; 16], [u8; 16])>(),
        (tid, tgid) in any::<(u32, u32)>(),
        oldstate in state_number(),
        newstate in state_number(),
        comm in any::<[u8; 16]>(),
        pad in any::<u8>(),
    ) -> TransitionEvent {
        TransitionEvent {
            kind: record_kind::TRANSITION,
            _pad: pad,
            family,
            sport,
            dport,
            ts_ns,
            skaddr,
            saddr,
            daddr,
            tid,
            tgid,
            oldstate,
            newstate,
            comm,
        }
    }
}

prop_compose! {
    /// A valid timewait timer record, built as the timer programs build it.
    fn timewait_event()(
        family in family_number(),
        (sport, dport) in any::<(u16, u16)>(),
        action in 1..=3u8,
        substate in 1..=12u8,
        (ts_ns, jiffies, twaddr, expires) in any::<(u64, u64, u64, u64)>(),
        (saddr, daddr) in any::<([u8; 16], [u8; 16])>(),
        pad in any::<[u8; 7]>(),
    ) -> TimewaitEvent {
        TimewaitEvent {
            kind: record_kind::TIMEWAIT,
            action,
            family,
            sport,
            dport,
            substate,
            _pad: pad,
            ts_ns,
            jiffies,
            twaddr,
            expires,
            saddr,
            daddr,
        }
    }
}

/// A buffer of exactly a record's size that starts with that record's kind: the rest is random,
/// but each checked field (family, states, action, substate) is made valid half of the time, so
/// that both the decoded and the refused paths are taken.
fn sized_record() -> impl Strategy<Value = Vec<u8>> {
    let transition = (
        vec(any::<u8>(), TRANSITION_EVENT_SIZE),
        family_number(),
        state_number(),
        state_number(),
        any::<[bool; 3]>(),
    )
        .prop_map(|(mut b, family, old, new, fix)| {
            b[0] = record_kind::TRANSITION;
            if fix[0] {
                b[2..4].copy_from_slice(&family.to_ne_bytes());
            }
            if fix[1] {
                b[64..68].copy_from_slice(&old.to_ne_bytes());
            }
            if fix[2] {
                b[68..72].copy_from_slice(&new.to_ne_bytes());
            }
            b
        });
    let timewait = (
        vec(any::<u8>(), TIMEWAIT_EVENT_SIZE),
        family_number(),
        1..=3u8,
        1..=12u8,
        any::<[bool; 3]>(),
    )
        .prop_map(|(mut b, family, action, substate, fix)| {
            b[0] = record_kind::TIMEWAIT;
            if fix[0] {
                b[2..4].copy_from_slice(&family.to_ne_bytes());
            }
            if fix[1] {
                b[1] = action;
            }
            if fix[2] {
                b[8] = substate;
            }
            b
        });
    prop_oneof![transition, timewait]
}

proptest! {
    #![proptest_config(config(2_000))]

    /// Any bytes of any length up to 300: decoded as specified or refused for a real defect,
    /// never a panic. A third of the buffers start with a valid kind byte, so that the length
    /// checks are reached too.
    #[test]
    fn decode_arbitrary_bytes_never_panics(
        mut bytes in vec(any::<u8>(), 0..300),
        kind in prop_oneof![Just(None), Just(Some(record_kind::TRANSITION)),
                            Just(Some(record_kind::TIMEWAIT))],
        jiffy_ns in jiffy_ns(),
    ) {
        if let (Some(kind), Some(first)) = (kind, bytes.first_mut()) {
            *first = kind;
        }
        check_decode(&bytes, jiffy_ns)?;
    }

    /// Buffers of exactly a record's size after a valid kind byte, with arbitrary content.
    #[test]
    fn decode_sized_records_with_arbitrary_content(
        bytes in sized_record(),
        jiffy_ns in jiffy_ns(),
    ) {
        check_decode(&bytes, jiffy_ns)?;
    }

    /// A transition record built from the ABI struct decodes to exactly its fields.
    #[test]
    fn decode_round_trips_transitions(raw in transition_event()) {
        let Ok(Record::Transition(t)) = Record::decode(&abi_bytes(&raw), 4 * MS) else {
            return Err(TestCaseError::fail(format!("not decoded: {raw:?}")));
        };
        prop_assert_eq!(t.ts_ns, raw.ts_ns);
        prop_assert_eq!(t.skaddr, raw.skaddr);
        prop_assert_eq!(t.old as i32, raw.oldstate);
        prop_assert_eq!(t.new as i32, raw.newstate);
        prop_assert_eq!((t.task.pid, t.task.tid), (raw.tgid, raw.tid));
        let comm = raw.comm.split(|&c| c == 0).next().unwrap_or_default();
        prop_assert_eq!(t.task.comm(), String::from_utf8_lossy(comm));
        check_ends(raw.family, t.family, (t.local, t.remote), &raw.saddr, &raw.daddr,
                   (raw.sport, raw.dport))?;
        prop_assert_eq!(t.made_by_syscall(),
                        tcpclose_common::made_by_syscall(raw.oldstate, raw.newstate));
    }

    /// A timewait timer record built from the ABI struct decodes to exactly its fields, the
    /// expiry converted from jiffies (wrapping counters) to nanoseconds.
    #[test]
    fn decode_round_trips_timewait_timers(
        raw in timewait_event(),
        ahead in prop_oneof![-100_000i64..100_000, any::<i64>()],
        jiffy_ns in jiffy_ns(),
    ) {
        let mut raw = raw;
        // The expiry as a small signed distance from `jiffies` most of the time, across the
        // counter's wrap wherever `jiffies` happens to be.
        raw.expires = raw.jiffies.wrapping_add(ahead as u64);
        let Ok(Record::Timewait(ev)) = Record::decode(&abi_bytes(&raw), jiffy_ns) else {
            return Err(TestCaseError::fail(format!("not decoded: {raw:?}")));
        };
        prop_assert_eq!(ev.ts_ns, raw.ts_ns);
        prop_assert_eq!(ev.twaddr, raw.twaddr);
        prop_assert_eq!(ev.substate as u8, raw.substate);
        let action = match ev.action {
            TimerAction::Armed => timer_action::START,
            TimerAction::Fired => timer_action::EXPIRE,
            TimerAction::Cancelled => timer_action::CANCEL,
        };
        prop_assert_eq!(action, raw.action);
        prop_assert_eq!(ev.jiffy_ns, jiffy_ns);
        let expires = i128::from(raw.ts_ns) + i128::from(ahead) * i128::from(jiffy_ns);
        prop_assert_eq!(i128::from(ev.expires_ns), expires.clamp(0, i128::from(u64::MAX)));
        check_ends(raw.family, ev.family, (ev.local, ev.remote), &raw.saddr, &raw.daddr,
                   (raw.sport, raw.dport))?;
    }
}

/// The decoded family and ends are the raw ones: an IPv4 address from the first 4 bytes.
fn check_ends(
    raw_family: u16,
    family: Family,
    (local, remote): (SocketAddr, SocketAddr),
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    (sport, dport): (u16, u16),
) -> Result<(), TestCaseError> {
    let ip = |a: &[u8; 16]| match family {
        Family::Ipv4 => IpAddr::from([a[0], a[1], a[2], a[3]]),
        Family::Ipv6 => IpAddr::from(*a),
    };
    let expected_family = if raw_family == AF_INET {
        Family::Ipv4
    } else {
        Family::Ipv6
    };
    prop_assert_eq!(family, expected_family);
    prop_assert_eq!(local, SocketAddr::new(ip(saddr), sport));
    prop_assert_eq!(remote, SocketAddr::new(ip(daddr), dport));
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// The engine, fed hostile streams
// ------------------------------------------------------------------------------------------------

/// Kernel addresses of full sockets: a few, so that they are reused by unrelated sockets. The
/// extremes are no sentinel to the engine.
const SOCKETS: [u64; 8] = [
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
const TIMEWAIT_SOCKETS: [u64; 4] = [
    0xffff_8881_0000_1000,
    0xffff_8881_0000_2000,
    0xffff_8880_0000_1000,
    u64::MAX,
];

/// 4-tuples: IPv4, IPv6 and IPv4-mapped IPv6 (a different 4-tuple to the engine than the plain
/// IPv4 one it maps). Each may also be seen with local port 0, as `connect()` reports
/// CLOSE -> SYN_SENT before it picks the port.
fn tuple(n: usize, port0: bool) -> (Family, SocketAddr, SocketAddr) {
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

const TUPLES: usize = 6;

/// Where the timestamps fed to the engine stay: CLOCK_MONOTONIC does not reach 2^62 ns (146
/// years), and the engine keeps `u64::MAX` as "unknown" (see [`extreme_timestamps`] for beyond).
const CLOCK_MAX: u64 = 1 << 62;

/// How the kernel's clock moves before a step: mostly forward, sometimes backwards (records of
/// different CPUs, or hostile input), sometimes far.
#[derive(Clone, Copy, Debug)]
enum Tick {
    Same,
    Forward(u64),
    Back(u64),
    Jump(u64),
}

impl Tick {
    fn apply(self, clock: u64) -> u64 {
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
enum Expiry {
    /// `ns` after the event (60 s for TIME_WAIT, tcp_fin_timeout for FIN_WAIT2).
    After(u64),
    /// `ns` before the event (a timer that fired late, or nonsense).
    Before(u64),
    /// Any time at all: whatever the decoder made of hostile `jiffies` and `expires`.
    Anywhere(u64),
}

/// Which state change a transition makes.
#[derive(Clone, Copy, Debug)]
enum Move {
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
enum Target {
    /// Any from the pools.
    Pool { tw: usize, tuple: usize },
    /// The timewait socket of the `k`th latest handoff of the stream, when there was one.
    Handed(usize),
}

/// One call into the engine. Indexes select from the pools above.
#[derive(Clone, Copy, Debug)]
enum Op {
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
fn next_states(state: TcpState) -> &'static [(TcpState, TcpState)] {
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

fn op() -> impl Strategy<Value = Op> {
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
fn thresholds() -> impl Strategy<Value = Thresholds> {
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
struct Case {
    max_sockets: usize,
    thresholds: Thresholds,
    /// Transitions take any 4-tuple from the pool. Otherwise each full socket address keeps
    /// its own (as a kernel socket does), so that alerts can be matched by 4-tuple.
    wild_tuples: bool,
    /// The engine configured as tcpclose runs it: timer events taken in the kernel's order, the
    /// handshakes' ends left out (see `Correlator::in_kernel_order`, `without_handshake_ends`).
    as_run: bool,
    /// The clock at the start.
    start_ns: u64,
    /// Sockets the start-up snapshot finds (as [`Op::Adopt`]s), before any event.
    snapshot: Vec<Op>,
    steps: Vec<(Tick, Op)>,
}

fn case(back_weight: u32, steps: std::ops::Range<usize>) -> impl Strategy<Value = Case> {
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

/// What the engine emitted: whether the streams reach what the properties are about.
#[derive(Clone, Copy, Debug, Default)]
struct Coverage {
    teardowns: u64,
    complete: u64,
    /// Ended on a timewait socket: by its timer, or killed.
    expired: u64,
    killed: u64,
    hung: u64,
    resolved: u64,
}

impl Coverage {
    fn add(&mut self, other: Coverage) {
        self.teardowns += other.teardowns;
        self.complete += other.complete;
        self.expired += other.expired;
        self.killed += other.killed;
        self.hung += other.hung;
        self.resolved += other.resolved;
    }
}

/// The time spent in all the phases of `t` (saturated: a bug may make them absurd).
fn phases_total(t: &Teardown) -> u64 {
    t.phases
        .iter()
        .fold(0, |total: u64, (_, ns)| total.saturating_add(ns))
}

/// What an [`Audit`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Everything.
    Strict,
    /// Only the cap, and that what is emitted can be read: timestamps at the clock's ends,
    /// where durations mean nothing. The loader's clock is whatever the stream says.
    Extreme,
    /// Nothing: only counts what is emitted.
    Survey,
}

/// Follows what is fed to the engine, and checks after each call what the engine says and
/// emits against what the inputs allow.
struct Audit {
    cap: usize,
    thresholds: Thresholds,
    wild_tuples: bool,
    /// Every time fed: event timestamps, the loader's clock readings. A teardown ends, and an
    /// alert is dated, at one of them.
    times: HashSet<u64>,
    /// The extremes of every time value fed (with the timers' expiries and sock_diag's ages):
    /// no single duration can exceed their span.
    lowest: u64,
    highest: u64,
    /// How far the times fed moved forward in all, in feed order: with the clock going back and
    /// forth, durations summed over a connection's passes are bounded by this, not by the span.
    forward: u64,
    last: Option<u64>,
    /// The latest event or clock reading: where the loader's clock is, at least.
    latest: u64,
    losses: Losses,
    hung: u64,
    resolved: u64,
    /// Per 4-tuple, hangs reported and not resolved yet (with `!wild_tuples`).
    open_hangs: HashMap<(SocketAddr, SocketAddr), u64>,
    coverage: Coverage,
    mode: Mode,
}

impl Audit {
    fn new(cap: usize, thresholds: Thresholds, wild_tuples: bool) -> Self {
        Self {
            // The engine follows at least 8 sockets, whatever it is asked.
            cap: cap.max(8),
            thresholds,
            wild_tuples,
            times: HashSet::new(),
            lowest: u64::MAX,
            highest: 0,
            forward: 0,
            last: None,
            latest: 0,
            losses: Losses::default(),
            hung: 0,
            resolved: 0,
            open_hangs: HashMap::new(),
            coverage: Coverage::default(),
            mode: Mode::Strict,
        }
    }

    /// A time value fed to the engine, in order.
    fn saw(&mut self, ns: u64) {
        self.lowest = self.lowest.min(ns);
        self.highest = self.highest.max(ns);
        if let Some(last) = self.last {
            self.forward = self.forward.saturating_add(ns.saturating_sub(last));
        }
        self.last = Some(ns);
    }

    /// An event's timestamp or a clock reading of the loader: something may end or be dated
    /// there.
    fn saw_time(&mut self, ns: u64) {
        self.times.insert(ns);
        self.latest = self.latest.max(ns);
        self.saw(ns);
    }

    /// The longest any duration may be: one span of everything fed, plus all the forward travel
    /// of a clock that went back and forth (a phase passed through several times).
    fn duration_bound(&self) -> u64 {
        let span = self.highest.saturating_sub(self.lowest);
        span.saturating_add(self.forward)
    }

    fn after_call(
        &mut self,
        c: &Correlator,
        out: &mut Vec<Teardown>,
        alerts: &mut Vec<Alert>,
    ) -> Result<(), TestCaseError> {
        for t in out.iter() {
            self.coverage.teardowns += 1;
            self.coverage.complete += u64::from(t.complete);
            self.coverage.expired += u64::from(t.timewait_end == Some(TimewaitEnd::Expired));
            self.coverage.killed += u64::from(t.timewait_end == Some(TimewaitEnd::Killed));
        }
        for a in alerts.iter() {
            match a.kind {
                AlertKind::Hung { again: false, .. } => self.coverage.hung += 1,
                AlertKind::Hung { again: true, .. } => {}
                AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => {
                    self.coverage.resolved += 1
                }
            }
        }
        if self.mode == Mode::Survey {
            out.clear();
            alerts.clear();
            return Ok(());
        }
        prop_assert!(
            c.len() <= self.cap,
            "{} sockets followed, more than the cap of {}",
            c.len(),
            self.cap
        );
        if self.mode == Mode::Extreme {
            // Reading what is emitted must not panic either (saturated sums, Debug).
            for t in out.drain(..) {
                let _ = format!("{t:?} {}", phases_total(&t));
            }
            for a in alerts.drain(..) {
                let _ = format!("{a:?}");
            }
            return Ok(());
        }
        prop_assert!(c.in_progress() <= c.len());
        let counted: u64 = c.state_counts().iter().map(|(_, n)| n).sum();
        prop_assert!(counted <= c.len() as u64, "{counted} counted by state");
        // Losses only ever grow.
        let losses = c.losses();
        prop_assert!(
            losses.evicted >= self.losses.evicted
                && losses.unfinished >= self.losses.unfinished
                && losses.timewait_unseen >= self.losses.timewait_unseen,
            "{:?} then {losses:?}",
            self.losses
        );
        self.losses = losses;
        for t in out.drain(..) {
            self.check_teardown(&t)?;
        }
        for a in alerts.drain(..) {
            self.check_alert(&a)?;
        }
        Ok(())
    }

    fn check_teardown(&self, t: &Teardown) -> Result<(), TestCaseError> {
        prop_assert!(
            self.times.contains(&t.end_ns),
            "ends at {}, a time never fed: {t:?}",
            t.end_ns
        );
        let bound = self.duration_bound();
        let phases = phases_total(t);
        prop_assert!(
            phases <= bound,
            "phases sum to {phases} ns, beyond all the time fed ({bound} ns): {t:?}"
        );
        let span = self.highest - self.lowest;
        for ns in [t.teardown_ns, t.lifetime_ns].into_iter().flatten() {
            prop_assert!(ns <= span, "{ns} ns, beyond the span fed ({span}): {t:?}");
        }
        if let Some(lifetime) = t.lifetime_ns {
            // A connection seen whole ("complete") was timed from events it went through in
            // order: its teardown and each of its phases fit in its life. (An incomplete one
            // may add to its phases what a lost event leaves to guesswork.)
            if t.complete {
                if let Some(teardown) = t.teardown_ns {
                    prop_assert!(
                        teardown <= lifetime,
                        "a teardown longer than the connection's life: {t:?}"
                    );
                }
                for (phase, ns) in t.phases.iter() {
                    prop_assert!(
                        ns <= lifetime,
                        "{} longer than the connection's life: {t:?}",
                        phase.name()
                    );
                }
            }
            // Only a connection seen born has a lifetime, and it was born on one side.
            prop_assert!(t.side.is_some(), "{t:?}");
        } else {
            // A connection seen whole was seen born: only an end before its birth would leave
            // it without a lifetime.
            prop_assert!(!t.complete, "complete, but no lifetime: {t:?}");
        }
        if t.close == CloseKind::FinTimeout {
            prop_assert_eq!(t.timewait_end, Some(TimewaitEnd::Expired), "{:?}", t);
        }
        if t.resolution_ns.is_some() {
            prop_assert!(t.timewait_end.is_some(), "jiffies without a timer: {t:?}");
        }
        if !self.wild_tuples {
            // A socket keeps its family: its addresses are of it.
            let v4 = matches!(t.family, Family::Ipv4);
            prop_assert_eq!(t.local.is_ipv4(), v4, "{:?}", t);
            prop_assert_eq!(t.remote.is_ipv4(), v4, "{:?}", t);
        }
        Ok(())
    }

    fn check_alert(&mut self, a: &Alert) -> Result<(), TestCaseError> {
        prop_assert!(self.times.contains(&a.ts_ns), "dated {}: {a:?}", a.ts_ns);
        let ends = (a.local, a.remote);
        match a.kind {
            AlertKind::Hung { age_ns, again } => {
                let threshold = self.thresholds.get(a.phase);
                prop_assert!(threshold.is_some(), "hung in a phase not watched: {a:?}");
                if !again {
                    prop_assert!(age_ns >= threshold.unwrap_or(0), "too early: {a:?}");
                    prop_assert_eq!(Some(age_ns), a.ts_ns.checked_sub(a.since_ns), "{:?}", a);
                    self.hung += 1;
                    *self.open_hangs.entry(ends).or_default() += 1;
                }
            }
            AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => {
                if let AlertKind::Evicted { age_ns } = a.kind {
                    prop_assert_eq!(Some(age_ns), a.ts_ns.checked_sub(a.since_ns), "{:?}", a);
                }
                // A hang ends (resolved, or no longer followed) at most once, and only after it
                // was reported: at no point have more hangs ended than were reported.
                self.resolved += 1;
                prop_assert!(
                    self.resolved <= self.hung,
                    "{} resolved, {} reported: {a:?}",
                    self.resolved,
                    self.hung
                );
                // A socket keeps its 4-tuple from its first teardown phase to its end, while its
                // key may change (start-up snapshot, full socket, timewait socket): the hang
                // resolved is one reported on the same 4-tuple.
                if !self.wild_tuples {
                    let open = self.open_hangs.entry(ends).or_default();
                    prop_assert!(*open > 0, "resolved, never reported hung: {a:?}");
                    *open -= 1;
                }
            }
        }
        Ok(())
    }
}

/// Turns [`Op`]s into calls into the engine, checked by an [`Audit`] after each: keeps the
/// state each socket address was left in (for [`Move::Follow`]) and the latest handoffs (for
/// [`Target::Handed`]).
struct Stream {
    c: Correlator,
    audit: Audit,
    wild_tuples: bool,
    states: [TcpState; SOCKETS.len()],
    /// `(timewait socket, 4-tuple)` of the latest handoffs, the latest last.
    handed: Vec<(usize, usize)>,
    out: Vec<Teardown>,
    alerts: Vec<Alert>,
}

impl Stream {
    fn new(max_sockets: usize, thresholds: Thresholds, wild_tuples: bool, as_run: bool) -> Self {
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
    fn feed(&mut self, op: Op, clock: &mut u64) -> Result<(), TestCaseError> {
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
    fn drain(&mut self) -> Result<(), TestCaseError> {
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

// ------------------------------------------------------------------------------------------------
// Extreme timestamps
// ------------------------------------------------------------------------------------------------

/// Timestamps the clock never reaches, at its ends (`u64::MAX` is the engine's "unknown"):
/// tolerated without a panic, the cap still holding.
fn extreme_timestamps() -> impl Strategy<Value = Vec<(u64, Op)>> {
    let ts = prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        (u64::MAX - 200 * S..=u64::MAX),
        any::<u64>(),
    ];
    vec((ts, op()), 1..500)
}

proptest! {
    #![proptest_config(config(200))]

    #[test]
    fn extreme_timestamps_never_panic(
        steps in extreme_timestamps(),
        thresholds in thresholds(),
        as_run in any::<bool>(),
    ) {
        let mut stream = Stream::new(8, thresholds, true, as_run);
        stream.audit.mode = Mode::Extreme;
        for (ts, op) in steps {
            let mut clock = ts;
            stream.feed(op, &mut clock)?;
        }
        stream.drain()?;
    }
}

// ------------------------------------------------------------------------------------------------
// Reused addresses, against a model
// ------------------------------------------------------------------------------------------------

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

// ------------------------------------------------------------------------------------------------
// Regressions: engine bugs the properties found, minimized
// ------------------------------------------------------------------------------------------------

/// A transition of socket `sk` on 4-tuple `n` at `ms` (+ `ns`).
fn transition_at(sk: u64, ns: u64, n: usize, old: TcpState, new: TcpState) -> Transition {
    let port0 = (old, new) == (TcpState::Close, TcpState::SynSent);
    let (family, local, remote) = tuple(n, port0);
    Transition {
        ts_ns: ns,
        skaddr: sk,
        family,
        local,
        remote,
        old,
        new,
        task: Task::new(7, 7, "app"),
    }
}

/// Feeds socket `sk` (on 4-tuple 0) the transitions `steps`, their times in `unit`s.
fn live(
    c: &mut Correlator,
    sk: u64,
    unit: u64,
    steps: &[(u64, TcpState, TcpState)],
    out: &mut Vec<Teardown>,
) {
    for &(t, old, new) in steps {
        c.on_transition(&transition_at(sk, t * unit, 0, old, new), out);
    }
}

/// A timer event of timewait socket `tw` on 4-tuple `n`.
fn timer_at(
    tw: u64,
    ns: u64,
    n: usize,
    substate: TcpState,
    action: TimerAction,
    expires_ns: u64,
) -> TimewaitTimer {
    let (family, local, remote) = tuple(n, false);
    TimewaitTimer {
        ts_ns: ns,
        twaddr: tw,
        family,
        local,
        remote,
        substate,
        action,
        expires_ns,
        jiffy_ns: 4 * MS,
    }
}

/// What a teardown seen whole must satisfy: it was seen born (a lifetime), and its teardown and
/// each of its phases fit in that life.
fn assert_whole_fits_its_life(t: &Teardown) {
    if !t.complete {
        return;
    }
    let lifetime = t
        .lifetime_ns
        .unwrap_or_else(|| panic!("complete, but no lifetime: {t:?}"));
    assert!(
        t.teardown_ns.is_none_or(|ns| ns <= lifetime),
        "teardown longer than the life: {t:?}"
    );
    for (phase, ns) in t.phases.iter() {
        assert!(
            ns <= lifetime,
            "{} longer than the life: {t:?}",
            phase.name()
        );
    }
}

/// Found by `clock_going_backwards_never_makes_up_durations` and
/// `hostile_streams_keep_the_engine_sound`. Records of one connection out of timestamp order (a
/// CPU's record submitted after a later one of another CPU; hostile input): SYN_SENT entered at
/// 100 ms, left at 50 ms. SYN_SENT is no teardown phase, so `Life::advance` does not see the
/// negative time in it as a gap: the connection stays "complete", with a teardown (and a
/// FIN_WAIT1) of 150 ms in a life of 100 ms.
#[test]
fn regression_clock_going_backwards_within_a_life() {
    use TcpState::*;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    live(
        &mut c,
        1,
        MS,
        &[
            (100, Close, SynSent),
            (50, SynSent, Established),
            (50, Established, FinWait1),
            (200, FinWait1, Close),
        ],
        &mut out,
    );
    assert_eq!(out.len(), 1, "{out:?}");
    assert_whole_fits_its_life(&out[0]);
}

/// Found by `hostile_streams_keep_the_engine_sound`. A timewait socket whose TIME_WAIT start is
/// derived from its timer's expiry (its arming was not seen), killed before that start: a kill
/// within a jiffy of the handoff, the expiry being rounded up to the jiffy (or, with hostile
/// `jiffies`/`expires`, any expiry). `Handoff::into_teardown` adds `from - at` to FIN_WAIT2
/// with `from` past the end (and a TIME_WAIT of 0): a loopback connection of 0.5 ms shows a
/// FIN_WAIT2 of 4.1 ms.
#[test]
fn regression_time_wait_derived_from_an_expiry_after_the_end() {
    use TcpState::*;
    const US: u64 = 1_000;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    live(
        &mut c,
        1,
        US,
        &[
            (0, Close, SynSent),
            (100, SynSent, Established),
            (200, Established, FinWait1),
            (300, FinWait1, FinWait2),
            (400, FinWait2, Close),
        ],
        &mut out,
    );
    // Killed 100 us after the handoff; armed for 60 s at the handoff, rounded up a jiffy.
    let expires = 400 * US + 60 * S + 4 * MS;
    let killed = timer_at(
        0xbeef,
        500 * US,
        0,
        TimeWait,
        TimerAction::Cancelled,
        expires,
    );
    c.on_timewait(&killed, &mut out);
    c.expire(S, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].timewait_end, Some(TimewaitEnd::Killed));
    assert_whole_fits_its_life(&out[0]);
}

/// Found by `hostile_streams_keep_the_engine_sound` (without the clock going back). A timewait
/// socket nobody handed over to (its full socket's `-> CLOSE` was lost) is killed by a
/// connect() reusing its 4-tuple; that new connection closes within the 2 s `unclaimed` events
/// are kept, and the slab gives its timewait socket the same address. At its handoff the dead
/// socket's arming and kill, kept in `unclaimed`, are replayed onto it: it "ends" at the old
/// kill, before it was born, and its own TIME_WAIT is lost.
#[test]
fn regression_events_of_an_earlier_timewait_socket_replayed_onto_a_handoff() {
    use TcpState::*;
    const TW: u64 = 0xffff_8881_0000_1000;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    let armed = |ms: u64| {
        timer_at(
            TW,
            ms * MS,
            0,
            TimeWait,
            TimerAction::Armed,
            ms * MS + 60 * S,
        )
    };
    // The unfollowed timewait socket: armed at 0, killed at 1 s by the new connection.
    c.on_timewait(&armed(0), &mut out);
    c.on_transition(&transition_at(1, S, 0, Close, SynSent), &mut out);
    let kill = timer_at(TW, S, 0, TimeWait, TimerAction::Cancelled, 60 * S);
    c.on_timewait(&kill, &mut out);
    live(
        &mut c,
        1,
        MS,
        &[
            (1_100, SynSent, Established),
            (1_500, Established, FinWait1),
            (1_600, FinWait1, FinWait2),
        ],
        &mut out,
    );
    c.on_timewait(&armed(1_700), &mut out);
    c.on_transition(&transition_at(1, 1_700 * MS, 0, FinWait2, Close), &mut out);
    let fired = timer_at(
        TW,
        61_700 * MS,
        0,
        TimeWait,
        TimerAction::Fired,
        61_700 * MS,
    );
    c.on_timewait(&fired, &mut out);
    c.expire(70 * S, &mut out);
    assert_eq!(out.len(), 1, "one connection was followed: {out:#?}");
    let t = &out[0];
    assert_whole_fits_its_life(t);
    assert_eq!(t.end_ns, 61_700 * MS, "{t:?}");
    assert_eq!(t.timewait_end, Some(TimewaitEnd::Expired), "{t:?}");
    assert_eq!(t.phases.get(Phase::TimeWait), Some(60 * S), "{t:?}");
    assert_eq!(t.lifetime_ns, Some(60_700 * MS), "{t:?}");
}

/// Found by `hostile_streams_keep_the_engine_sound`. `make_room` evicts only full and timewait
/// sockets: when start-up sockets (`existing`, never evicted) fill the cap, a new connection
/// goes over it, and each further one evicts the previous (only one live connection is
/// followed at a time, each ending unseen: incomplete, without a lifetime).
#[test]
fn regression_start_up_sockets_fill_the_cap() {
    use TcpState::*;
    let mut c = Correlator::new(8);
    for port in 0..8 {
        c.adopt_existing(&ExistingSocket {
            family: Family::Ipv4,
            local: SocketAddr::from(([10, 0, 0, 1], 50_000 + port)),
            remote: SocketAddr::from(([10, 0, 0, 2], 80)),
            state: CloseWait,
            seen_ns: 0,
        });
    }
    assert_eq!(c.len(), 8);
    let mut out = Vec::new();
    for sk in 1..=3 {
        c.on_transition(&transition_at(sk, MS, 0, Close, SynSent), &mut out);
        assert!(c.len() <= 8, "{} followed, over the cap of 8", c.len());
    }
}

/// Found by `hostile_streams_keep_the_engine_sound`. Timewait sockets armed with no handoff to
/// claim them (their full sockets' events lost, or not followed) are kept in `unclaimed` for
/// 2 s; `make_room` does not evict them, and with no full or timewait socket to evict, nothing
/// bounds them but that wait.
#[test]
fn regression_unclaimed_timewait_sockets_go_over_the_cap() {
    let mut c = Correlator::new(8);
    let mut out = Vec::new();
    for port in 0..20 {
        let ev = TimewaitTimer {
            ts_ns: MS,
            twaddr: 0x1000 * (port + 1),
            family: Family::Ipv4,
            local: SocketAddr::from(([10, 0, 0, 1], 50_000 + port as u16)),
            remote: SocketAddr::from(([10, 0, 0, 2], 80)),
            substate: TcpState::TimeWait,
            action: TimerAction::Armed,
            expires_ns: MS + 60 * S,
            jiffy_ns: 4 * MS,
        };
        c.on_timewait(&ev, &mut out);
        assert!(c.len() <= 8, "{} followed, over the cap of 8", c.len());
    }
}

/// Found by `clock_going_backwards_never_makes_up_durations` and
/// `hostile_streams_keep_the_engine_sound` once the four above were fixed. An orphan's timer
/// re-armed in TIME_WAIT (the peer's FIN) by a record dated before the handoff, even before the
/// connection's birth: `Handoff::observe_timer` took that time as TIME_WAIT's start, and the
/// connection, still "complete", spent longer in TIME_WAIT than it lived.
#[test]
fn regression_fin_of_an_orphan_dated_before_the_handoff() {
    use TcpState::*;
    const TW: u64 = 0xffff_8881_0000_1000;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    let orphaned = timer_at(TW, 1_004 * MS, 0, FinWait2, TimerAction::Armed, 61_004 * MS);
    live(
        &mut c,
        1,
        MS,
        &[
            (1_000, Close, SynSent),
            (1_001, SynSent, Established),
            (1_002, Established, FinWait1),
            (1_003, FinWait1, FinWait2),
        ],
        &mut out,
    );
    c.on_timewait(&orphaned, &mut out);
    c.on_transition(&transition_at(1, 1_004 * MS, 0, FinWait2, Close), &mut out);
    // The peer's FIN, dated half a second before the connection was born.
    let fin = timer_at(TW, 500 * MS, 0, TimeWait, TimerAction::Armed, 60_500 * MS);
    c.on_timewait(&fin, &mut out);
    let fired = timer_at(TW, 1_005 * MS, 0, TimeWait, TimerAction::Fired, 1_005 * MS);
    c.on_timewait(&fired, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].timewait_end, Some(TimewaitEnd::Expired));
    assert_whole_fits_its_life(&out[0]);
}
