//! The decoder ([`Record::decode`]), checked against a specification written here from the ABI's
//! field offsets: every buffer is either decoded into exactly the fields it holds or refused for a
//! defect it really has.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::{collection::vec, prelude::*};
use tcpclose::event::{
    Cause, CauseKind, DecodeError, Family, Record, TcpState, TimerAction, TimewaitTimer,
};
use tcpclose_common::{
    AF_INET, AF_INET6, CAUSE_EVENT_SIZE, NO_REASON, TIMEWAIT_EVENT_SIZE, TRANSITION_EVENT_SIZE,
    TimewaitEvent, TransitionEvent, cause, record_kind, timer_action,
};

use crate::{MS, config};

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
        netns: u32,
        cgroup: u64,
    },
    Timewait(TimewaitTimer),
    Cause(Cause),
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
        Some(record_kind::CAUSE) if bytes.len() == CAUSE_EVENT_SIZE => spec_cause(bytes),
        Some(record_kind::TRANSITION | record_kind::TIMEWAIT | record_kind::CAUSE) => {
            Err(vec![DecodeError::Length(bytes.len())])
        }
        Some(kind) => Err(vec![DecodeError::UnknownKind(kind)]),
    }
}

/// `TransitionEvent`: kind 0, _pad 1, family 2, sport 4, dport 6, ts_ns 8, skaddr 16, saddr 24,
/// daddr 40, tid 56, tgid 60, oldstate 64, newstate 68, comm 72, cgroup 88, netns 96, _pad2 100.
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
                netns: u32_at(b, 96),
                cgroup: u64_at(b, 88),
            })
        }
        (ends, old, new) => Err([ends.err(), old.err(), new.err()]
            .into_iter()
            .flatten()
            .collect()),
    }
}

/// `TimewaitEvent`: kind 0, action 1, family 2, sport 4, dport 6, substate 8, _pad 9, netns 12,
/// ts_ns 16,
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
                netns: u32_at(b, 12),
            }))
        }
        (ends, action, substate) => Err([ends.err(), action.err(), substate.err()]
            .into_iter()
            .flatten()
            .collect()),
    }
}

/// `CauseEvent`: kind 0, cause 1, state 2, _pad 3, reason 4, ts_ns 8, skaddr 16.
fn spec_cause(b: &[u8]) -> Result<Expected, Vec<DecodeError>> {
    let reason = u32_at(b, 4);
    let kind = match b[1] {
        cause::RESET_SENT => Ok(CauseKind::ResetSent {
            reason: (reason <= u32::from(u16::MAX)).then_some(reason as u16),
        }),
        cause::RESET_RECEIVED => Ok(CauseKind::ResetReceived),
        cause::FIN_RETRANSMIT => Ok(CauseKind::FinRetransmit),
        other => Err(DecodeError::UnknownCause(other)),
    };
    match (kind, spec_state(i32::from(b[2]))) {
        (Ok(kind), Ok(state)) => Ok(Expected::Cause(Cause {
            ts_ns: u64_at(b, 8),
            skaddr: u64_at(b, 16),
            state,
            kind,
        })),
        (kind, state) => Err([kind.err(), state.err()].into_iter().flatten().collect()),
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
            netns: t.placement.netns,
            cgroup: t.placement.cgroup,
        },
        Record::Timewait(ev) => Expected::Timewait(ev),
        Record::Cause(c) => Expected::Cause(c),
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
pub(crate) fn jiffy_ns() -> impl Strategy<Value = u64> {
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
        (cgroup, netns, pad2) in any::<(u64, u32, u32)>(),
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
            _pad2: pad2,
            cgroup,
            netns,
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
        (pad, netns) in any::<([u8; 3], u32)>(),
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
            netns,
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
    let cause = (
        vec(any::<u8>(), CAUSE_EVENT_SIZE),
        1..=3u8,
        1..=12u8,
        prop_oneof![Just(NO_REASON), 0..64u32, any::<u32>()],
        any::<[bool; 2]>(),
    )
        .prop_map(|(mut b, what, state, reason, fix)| {
            b[0] = record_kind::CAUSE;
            b[4..8].copy_from_slice(&reason.to_ne_bytes());
            if fix[0] {
                b[1] = what;
            }
            if fix[1] {
                b[2] = state;
            }
            b
        });
    prop_oneof![transition, timewait, cause]
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
                            Just(Some(record_kind::TIMEWAIT)), Just(Some(record_kind::CAUSE))],
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
