//! Decoding of the kernel's ring buffer records: the one place where kernel bytes become types.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tcpclose_common::{
    AF_INET, AF_INET6, CAUSE_EVENT_SIZE, CauseEvent, NO_REASON, TIMEWAIT_EVENT_SIZE,
    TRANSITION_EVENT_SIZE, TimewaitEvent, TransitionEvent, cause, record_kind, tcp_state,
    timer_action,
};

/// A TCP state, numbered as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TcpState {
    Established = tcp_state::ESTABLISHED as u8,
    SynSent = tcp_state::SYN_SENT as u8,
    SynRecv = tcp_state::SYN_RECV as u8,
    FinWait1 = tcp_state::FIN_WAIT1 as u8,
    FinWait2 = tcp_state::FIN_WAIT2 as u8,
    TimeWait = tcp_state::TIME_WAIT as u8,
    Close = tcp_state::CLOSE as u8,
    CloseWait = tcp_state::CLOSE_WAIT as u8,
    LastAck = tcp_state::LAST_ACK as u8,
    Listen = tcp_state::LISTEN as u8,
    Closing = tcp_state::CLOSING as u8,
    NewSynRecv = tcp_state::NEW_SYN_RECV as u8,
}

impl TcpState {
    pub const ALL: [TcpState; 12] = [
        Self::Established,
        Self::SynSent,
        Self::SynRecv,
        Self::FinWait1,
        Self::FinWait2,
        Self::TimeWait,
        Self::Close,
        Self::CloseWait,
        Self::LastAck,
        Self::Listen,
        Self::Closing,
        Self::NewSynRecv,
    ];

    /// The kernel's name without `TCP_`, as `ss` and tcpstates print it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
        }
    }
}

impl TryFrom<i32> for TcpState {
    type Error = DecodeError;

    fn try_from(value: i32) -> Result<Self, DecodeError> {
        Self::ALL
            .into_iter()
            .find(|state| *state as i32 == value)
            .ok_or(DecodeError::UnknownState(value))
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// Why a ring buffer record could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is not the size its kind says (loader and program disagree).
    Length(usize),
    UnknownKind(u8),
    UnknownState(i32),
    UnknownFamily(u16),
    UnknownTimerAction(u8),
    UnknownCause(u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length(len) => write!(
                f,
                "record of {len} bytes, expected {TRANSITION_EVENT_SIZE} (transition), \
                 {TIMEWAIT_EVENT_SIZE} (timewait timer) or {CAUSE_EVENT_SIZE} (reset or \
                 retransmission)"
            ),
            Self::UnknownKind(kind) => write!(f, "unknown record kind {kind}"),
            Self::UnknownState(state) => write!(f, "unknown TCP state {state}"),
            Self::UnknownFamily(family) => write!(f, "unknown address family {family}"),
            Self::UnknownTimerAction(action) => write!(f, "unknown timer action {action}"),
            Self::UnknownCause(what) => write!(f, "unknown cause {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The task that was current when the kernel changed a socket's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    comm: [u8; 16],
}

impl Task {
    pub fn new(pid: u32, tid: u32, comm: &str) -> Self {
        let mut bytes = [0; 16];
        let len = comm.len().min(15);
        bytes[..len].copy_from_slice(&comm.as_bytes()[..len]);
        Self {
            pid,
            tid,
            comm: bytes,
        }
    }

    pub fn comm(&self) -> Cow<'_, str> {
        let len = self.comm.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.comm[..len])
    }
}

/// Where a socket lives: its network namespace and its cgroup2 cgroup, as the kernel records
/// them in the socket (not the task that happened to be current). 0 stands for unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Placement {
    /// Inode number of the network namespace (`stat -L /proc/PID/ns/net`).
    pub netns: u32,
    /// Id of the cgroup2 cgroup (its directory's inode number) of the task that made the
    /// socket, or of its listener for an accepted socket.
    pub cgroup: u64,
}

impl Placement {
    pub const UNKNOWN: Self = Self {
        netns: 0,
        cgroup: 0,
    };

    pub fn netns(self) -> Option<u32> {
        (self.netns != 0).then_some(self.netns)
    }

    pub fn cgroup(self) -> Option<u64> {
        (self.cgroup != 0).then_some(self.cgroup)
    }

    /// This placement, its unknown parts taken from `other`.
    pub fn or(self, other: Self) -> Self {
        Self {
            netns: if self.netns != 0 {
                self.netns
            } else {
                other.netns
            },
            cgroup: if self.cgroup != 0 {
                self.cgroup
            } else {
                other.cgroup
            },
        }
    }
}

/// One TCP state change of one socket, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket.
    pub skaddr: u64,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub old: TcpState,
    pub new: TcpState,
    /// The task current at the tracepoint; its owner only when [`Transition::made_by_syscall`].
    pub task: Task,
    pub placement: Placement,
}

/// One ring buffer record, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Transition(Transition),
    Timewait(TimewaitTimer),
    Cause(Cause),
}

impl Record {
    /// Decodes one ring buffer record; `jiffy_ns` is the length of the kernel's jiffy (1 s /
    /// CONFIG_HZ), used to convert timer expiries.
    pub fn decode(bytes: &[u8], jiffy_ns: u64) -> Result<Self, DecodeError> {
        match bytes.first() {
            Some(&record_kind::TRANSITION) => Transition::decode(bytes).map(Self::Transition),
            Some(&record_kind::TIMEWAIT) => {
                TimewaitTimer::decode(bytes, jiffy_ns).map(Self::Timewait)
            }
            Some(&record_kind::CAUSE) => Cause::decode(bytes).map(Self::Cause),
            Some(&other) => Err(DecodeError::UnknownKind(other)),
            None => Err(DecodeError::Length(0)),
        }
    }
}

/// Copies a record out of `bytes` after checking its length.
fn read_record<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    tcpclose_common::record_bytes::read(bytes).ok_or(DecodeError::Length(bytes.len()))
}

/// The two ends of a socket from the kernel's representation (addresses in network order,
/// ports in host order).
fn endpoints(
    family: u16,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
    sport: u16,
    dport: u16,
) -> Result<(Family, SocketAddr, SocketAddr), DecodeError> {
    let (family, local_ip, remote_ip) = match family {
        AF_INET => (Family::Ipv4, ipv4(saddr), ipv4(daddr)),
        AF_INET6 => (
            Family::Ipv6,
            IpAddr::V6(Ipv6Addr::from(*saddr)),
            IpAddr::V6(Ipv6Addr::from(*daddr)),
        ),
        other => return Err(DecodeError::UnknownFamily(other)),
    };
    Ok((
        family,
        SocketAddr::new(local_ip, sport),
        SocketAddr::new(remote_ip, dport),
    ))
}

impl Transition {
    /// Decodes one transition record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let raw = read_record::<TransitionEvent>(bytes)?;
        if raw.kind != record_kind::TRANSITION {
            return Err(DecodeError::UnknownKind(raw.kind));
        }
        Self::from_raw(&raw)
    }

    pub fn from_raw(raw: &TransitionEvent) -> Result<Self, DecodeError> {
        let (family, local, remote) =
            endpoints(raw.family, &raw.saddr, &raw.daddr, raw.sport, raw.dport)?;
        Ok(Self {
            ts_ns: raw.ts_ns,
            skaddr: raw.skaddr,
            family,
            local,
            remote,
            old: TcpState::try_from(raw.oldstate)?,
            new: TcpState::try_from(raw.newstate)?,
            task: Task {
                pid: raw.tgid,
                tid: raw.tid,
                comm: raw.comm,
            },
            placement: Placement {
                netns: raw.netns,
                cgroup: raw.cgroup,
            },
        })
    }

    /// Whether a system call on the socket made this transition, so that the current task is the
    /// socket's owner: see [`tcpclose_common::made_by_syscall`], which the kernel program uses
    /// too (it fetches `comm` only for these).
    pub fn made_by_syscall(&self) -> bool {
        tcpclose_common::made_by_syscall(self.old as i32, self.new as i32)
    }

    /// The socket's owning task, when this transition reveals it.
    pub fn owner(&self) -> Option<&Task> {
        self.made_by_syscall().then_some(&self.task)
    }
}

/// What happened to a timewait socket's timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerAction {
    /// `timer_start`: queued, at creation (`inet_twsk_schedule()`) or when the peer's FIN moves
    /// an orphaned FIN_WAIT2 to TIME_WAIT and the new expiry falls into another wheel bucket.
    Armed,
    /// `timer_expire_entry`: `tw_timer_handler()` runs; the timewait socket goes away.
    Fired,
    /// `timer_cancel`: taken off the wheel. Either the socket is killed early
    /// (`inet_twsk_deschedule_put()`: the 4-tuple was reused, an RST came), or the timer is
    /// being moved (`__mod_timer()` detaches it before it queues it again: an `Armed` follows),
    /// or it is about to fire (`expire_timers()` detaches it first: a `Fired` follows).
    Cancelled,
}

/// A timewait socket's timer event, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitTimer {
    pub ts_ns: u64,
    /// Kernel address of the `inet_timewait_sock`.
    pub twaddr: u64,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `tw_substate`: FIN_WAIT2 or TIME_WAIT.
    pub substate: TcpState,
    pub action: TimerAction,
    /// When the timer is due, converted from jiffies to CLOCK_MONOTONIC ns.
    pub expires_ns: u64,
    /// Resolution of `expires_ns` (one jiffy).
    pub jiffy_ns: u64,
    /// Inode number of the timewait socket's network namespace; 0 when unknown.
    pub netns: u32,
}

impl TimewaitTimer {
    /// Decodes one timewait timer record; see [`Record::decode`].
    pub fn decode(bytes: &[u8], jiffy_ns: u64) -> Result<Self, DecodeError> {
        let raw = read_record::<TimewaitEvent>(bytes)?;
        if raw.kind != record_kind::TIMEWAIT {
            return Err(DecodeError::UnknownKind(raw.kind));
        }
        let (family, local, remote) =
            endpoints(raw.family, &raw.saddr, &raw.daddr, raw.sport, raw.dport)?;
        let action = match raw.action {
            timer_action::START => TimerAction::Armed,
            timer_action::EXPIRE => TimerAction::Fired,
            timer_action::CANCEL => TimerAction::Cancelled,
            other => return Err(DecodeError::UnknownTimerAction(other)),
        };
        // `jiffies` was read at `ts_ns`; jiffies are unsigned and wrap, so the distance to the
        // expiry is their wrapping difference, signed.
        let ahead = raw.expires.wrapping_sub(raw.jiffies) as i64;
        let expires_ns = i128::from(raw.ts_ns) + i128::from(ahead) * i128::from(jiffy_ns);
        Ok(Self {
            ts_ns: raw.ts_ns,
            twaddr: raw.twaddr,
            family,
            local,
            remote,
            substate: TcpState::try_from(i32::from(raw.substate))?,
            action,
            expires_ns: u64::try_from(expires_ns.max(0)).unwrap_or(u64::MAX),
            jiffy_ns,
            netns: raw.netns,
        })
    }
}

/// What the kernel did to a full socket that explains how its teardown went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CauseKind {
    /// The kernel sent an RST: on close with unread data or `SO_LINGER` 0, or in answer to a
    /// segment. `reason` is the kernel's `enum sk_rst_reason` value (Linux 6.10+).
    ResetSent { reason: Option<u16> },
    /// An RST from the peer was accepted.
    ResetReceived,
    /// A segment was retransmitted after the socket sent its FIN (in FIN_WAIT1, CLOSING or
    /// LAST_ACK, where the FIN is not acknowledged yet).
    FinRetransmit,
}

/// A reset or FIN retransmission of a full socket, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cause {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket.
    pub skaddr: u64,
    /// The socket's state when it happened.
    pub state: TcpState,
    pub kind: CauseKind,
}

impl Cause {
    /// Decodes one cause record; see [`Record::decode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let raw = read_record::<CauseEvent>(bytes)?;
        if raw.kind != record_kind::CAUSE {
            return Err(DecodeError::UnknownKind(raw.kind));
        }
        let kind = match raw.cause {
            cause::RESET_SENT => CauseKind::ResetSent {
                reason: (raw.reason != NO_REASON)
                    .then(|| u16::try_from(raw.reason).ok())
                    .flatten(),
            },
            cause::RESET_RECEIVED => CauseKind::ResetReceived,
            cause::FIN_RETRANSMIT => CauseKind::FinRetransmit,
            other => return Err(DecodeError::UnknownCause(other)),
        };
        Ok(Self {
            ts_ns: raw.ts_ns,
            skaddr: raw.skaddr,
            state: TcpState::try_from(i32::from(raw.state))?,
            kind,
        })
    }
}

fn ipv4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> TransitionEvent {
        let mut comm = [0; 16];
        comm[..4].copy_from_slice(b"curl");
        TransitionEvent {
            kind: record_kind::TRANSITION,
            _pad: 0,
            ts_ns: 1_000,
            skaddr: 0xffff_8880_0000_1000,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            tid: 43,
            tgid: 42,
            oldstate: 1,
            newstate: 4,
            sport: 40_000,
            dport: 8080,
            family: AF_INET,
            comm,
            cgroup: 0x1234,
            netns: 4_026_531_840,
            _pad2: 0,
        }
    }

    fn bytes<T: aya::Pod>(raw: &T) -> Vec<u8> {
        tcpclose_common::record_bytes::of(raw).to_vec()
    }

    fn raw_timer() -> TimewaitEvent {
        TimewaitEvent {
            kind: record_kind::TIMEWAIT,
            action: timer_action::START,
            family: AF_INET6,
            sport: 40_000,
            dport: 443,
            substate: TcpState::FinWait2 as u8,
            _pad: [0; 3],
            netns: 4_026_532_000,
            ts_ns: 10_000_000_000,
            jiffies: u64::MAX - 1,
            twaddr: 0xffff_8880_0000_2000,
            // Wrapped: 250 jiffies ahead.
            expires: 248,
            saddr: Ipv6Addr::LOCALHOST.octets(),
            daddr: "2001:db8::2".parse::<Ipv6Addr>().unwrap().octets(),
        }
    }

    #[test]
    fn decodes_causes() {
        let raw = CauseEvent {
            kind: record_kind::CAUSE,
            cause: cause::RESET_SENT,
            state: TcpState::Close as u8,
            _pad: 0,
            reason: 11,
            ts_ns: 5,
            skaddr: 0xffff_8880_0000_1000,
        };
        assert_eq!(
            Record::decode(&bytes(&raw), 1),
            Ok(Record::Cause(Cause {
                ts_ns: 5,
                skaddr: 0xffff_8880_0000_1000,
                state: TcpState::Close,
                kind: CauseKind::ResetSent { reason: Some(11) },
            }))
        );
        for (reason, expected) in [(NO_REASON, None), (1 << 20, None), (0, Some(0))] {
            let r = CauseEvent { reason, ..raw };
            let Ok(Record::Cause(c)) = Record::decode(&bytes(&r), 1) else {
                panic!("{r:?}")
            };
            assert_eq!(c.kind, CauseKind::ResetSent { reason: expected });
        }
        for (what, expected) in [
            (cause::RESET_RECEIVED, CauseKind::ResetReceived),
            (cause::FIN_RETRANSMIT, CauseKind::FinRetransmit),
        ] {
            let r = CauseEvent { cause: what, ..raw };
            assert_eq!(Cause::decode(&bytes(&r)).map(|c| c.kind), Ok(expected));
        }
        let r = CauseEvent { cause: 9, ..raw };
        assert_eq!(Cause::decode(&bytes(&r)), Err(DecodeError::UnknownCause(9)));
        let r = CauseEvent { state: 99, ..raw };
        assert_eq!(
            Cause::decode(&bytes(&r)),
            Err(DecodeError::UnknownState(99))
        );
        assert_eq!(
            Record::decode(&bytes(&raw)[..20], 1),
            Err(DecodeError::Length(20))
        );
    }

    #[test]
    fn decodes_timewait_timers_and_converts_jiffies() {
        let jiffy = 4_000_000;
        let Record::Timewait(t) = Record::decode(&bytes(&raw_timer()), jiffy).unwrap() else {
            panic!("not a timer record")
        };
        assert_eq!(t.action, TimerAction::Armed);
        assert_eq!(t.substate, TcpState::FinWait2);
        assert_eq!(t.local, "[::1]:40000".parse().unwrap());
        assert_eq!(t.remote, "[2001:db8::2]:443".parse().unwrap());
        assert_eq!(t.expires_ns, 10_000_000_000 + 250 * jiffy);
        assert_eq!(t.jiffy_ns, jiffy);
        assert_eq!(t.netns, 4_026_532_000);
        // An expiry in the past converts to an earlier time, never below 0.
        let mut r = raw_timer();
        r.jiffies = 1_000;
        r.expires = 0;
        let t = TimewaitTimer::decode(&bytes(&r), jiffy).unwrap();
        assert_eq!(t.expires_ns, 10_000_000_000 - 1_000 * jiffy);
        r.ts_ns = 0;
        assert_eq!(
            TimewaitTimer::decode(&bytes(&r), jiffy).unwrap().expires_ns,
            0
        );
        for (action, expected) in [
            (timer_action::EXPIRE, TimerAction::Fired),
            (timer_action::CANCEL, TimerAction::Cancelled),
        ] {
            let mut r = raw_timer();
            r.action = action;
            assert_eq!(
                TimewaitTimer::decode(&bytes(&r), jiffy).unwrap().action,
                expected
            );
        }
        let mut r = raw_timer();
        r.action = 9;
        assert_eq!(
            Record::decode(&bytes(&r), jiffy),
            Err(DecodeError::UnknownTimerAction(9))
        );
        let mut r = raw_timer();
        r.substate = 99;
        assert_eq!(
            Record::decode(&bytes(&r), jiffy),
            Err(DecodeError::UnknownState(99))
        );
    }

    #[test]
    fn dispatches_on_the_record_kind() {
        assert!(matches!(
            Record::decode(&bytes(&raw()), 1),
            Ok(Record::Transition(_))
        ));
        let mut b = bytes(&raw());
        b[0] = 7;
        assert_eq!(Record::decode(&b, 1), Err(DecodeError::UnknownKind(7)));
        assert_eq!(Record::decode(&[], 1), Err(DecodeError::Length(0)));
        // A timer record cut to a transition's length is refused, not misread.
        let mut t = bytes(&raw_timer());
        t.resize(TRANSITION_EVENT_SIZE, 0);
        assert_eq!(
            Record::decode(&t, 1),
            Err(DecodeError::Length(TRANSITION_EVENT_SIZE))
        );
    }

    #[test]
    fn decodes_ipv4() {
        let t = Transition::decode(&bytes(&raw())).expect("valid record");
        assert_eq!(t.family, Family::Ipv4);
        assert_eq!(t.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(t.remote, "10.1.2.3:8080".parse().unwrap());
        assert_eq!((t.old, t.new), (TcpState::Established, TcpState::FinWait1));
        assert_eq!(t.task.pid, 42);
        assert_eq!(t.task.tid, 43);
        assert_eq!(t.task.comm(), "curl");
        assert!(t.made_by_syscall());
        assert_eq!(t.owner().map(|task| task.pid), Some(42));
        assert_eq!(
            t.placement,
            Placement {
                netns: 4_026_531_840,
                cgroup: 0x1234
            }
        );
    }

    #[test]
    fn decodes_ipv6() {
        let mut r = raw();
        r.family = AF_INET6;
        r.saddr = Ipv6Addr::LOCALHOST.octets();
        r.daddr = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let t = Transition::decode(&bytes(&r)).expect("valid record");
        assert_eq!(t.family, Family::Ipv6);
        assert_eq!(t.local, "[::1]:40000".parse().unwrap());
        assert_eq!(t.remote, "[2001:db8::1]:8080".parse().unwrap());
    }

    #[test]
    fn rejects_short_and_long_records() {
        let b = bytes(&raw());
        assert_eq!(
            Transition::decode(&b[..TRANSITION_EVENT_SIZE - 1]),
            Err(DecodeError::Length(TRANSITION_EVENT_SIZE - 1))
        );
        assert_eq!(Transition::decode(&[]), Err(DecodeError::Length(0)));
        let mut long = b.clone();
        long.push(0);
        assert_eq!(
            Transition::decode(&long),
            Err(DecodeError::Length(TRANSITION_EVENT_SIZE + 1))
        );
    }

    #[test]
    fn rejects_unknown_states_and_families() {
        for bad in [0, 13, -1, i32::MAX] {
            let mut r = raw();
            r.newstate = bad;
            assert_eq!(
                Transition::decode(&bytes(&r)),
                Err(DecodeError::UnknownState(bad))
            );
            let mut r = raw();
            r.oldstate = bad;
            assert_eq!(
                Transition::decode(&bytes(&r)),
                Err(DecodeError::UnknownState(bad))
            );
        }
        let mut r = raw();
        r.family = 1;
        assert_eq!(
            Transition::decode(&bytes(&r)),
            Err(DecodeError::UnknownFamily(1))
        );
    }

    #[test]
    fn state_numbers_round_trip() {
        for state in TcpState::ALL {
            assert_eq!(TcpState::try_from(state as i32), Ok(state));
        }
        assert_eq!(TcpState::CloseWait.name(), "CLOSE_WAIT");
        assert_eq!(TcpState::try_from(8), Ok(TcpState::CloseWait));
    }

    #[test]
    fn owner_only_for_syscall_transitions() {
        let mut r = raw();
        r.oldstate = TcpState::Established as i32;
        r.newstate = TcpState::CloseWait as i32;
        let t = Transition::decode(&bytes(&r)).expect("valid record");
        assert!(t.owner().is_none());
        r.oldstate = TcpState::Close as i32;
        r.newstate = TcpState::SynSent as i32;
        assert!(Transition::decode(&bytes(&r)).unwrap().owner().is_some());
    }

    /// Valid records with random bytes changed, cut or extended, and random bytes of any
    /// length: each decodes or is refused, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid = [bytes(&raw()), bytes(&raw_timer())];
        let (mut decoded, mut refused) = (0, 0);
        for _ in 0..200_000 {
            let mut b = match next() % 8 {
                0 => (0..next() % 128).map(|_| next() as u8).collect(),
                n => valid[n as usize % 2].clone(),
            };
            for _ in 0..next() % 4 {
                if !b.is_empty() {
                    let at = next() as usize % b.len();
                    b[at] = next() as u8;
                }
            }
            match next() % 16 {
                0 => b.truncate(next() as usize % (b.len() + 1)),
                1 => b.push(next() as u8),
                _ => {}
            }
            match Record::decode(&b, next() % 10_000_000) {
                Ok(_) => decoded += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(
            decoded > 0 && refused > 0,
            "{decoded} decoded, {refused} refused"
        );
    }
}
