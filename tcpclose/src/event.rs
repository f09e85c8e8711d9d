//! Decoding of the kernel's ring buffer records: the one place where kernel bytes become types.

use std::{
    borrow::Cow,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use tcpclose_common::{AF_INET, AF_INET6, TRANSITION_EVENT_SIZE, TransitionEvent};

/// A TCP state, numbered as the kernel numbers them (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
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
    /// The record is not the size of a `TransitionEvent` (loader and program disagree).
    Length(usize),
    UnknownState(i32),
    UnknownFamily(u16),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length(len) => {
                write!(f, "record of {len} bytes, expected {TRANSITION_EVENT_SIZE}")
            }
            Self::UnknownState(state) => write!(f, "unknown TCP state {state}"),
            Self::UnknownFamily(family) => write!(f, "unknown address family {family}"),
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
}

impl Transition {
    /// Decodes one ring buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != TRANSITION_EVENT_SIZE {
            return Err(DecodeError::Length(bytes.len()));
        }
        // SAFETY: the length is checked above and `TransitionEvent` is plain old data (every bit
        // pattern is a valid value); `read_unaligned` makes no alignment assumption.
        let raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<TransitionEvent>()) };
        Self::from_raw(&raw)
    }

    pub fn from_raw(raw: &TransitionEvent) -> Result<Self, DecodeError> {
        let (family, local_ip, remote_ip) = match raw.family {
            AF_INET => (Family::Ipv4, ipv4(&raw.saddr), ipv4(&raw.daddr)),
            AF_INET6 => (
                Family::Ipv6,
                IpAddr::V6(Ipv6Addr::from(raw.saddr)),
                IpAddr::V6(Ipv6Addr::from(raw.daddr)),
            ),
            other => return Err(DecodeError::UnknownFamily(other)),
        };
        Ok(Self {
            ts_ns: raw.ts_ns,
            skaddr: raw.skaddr,
            family,
            local: SocketAddr::new(local_ip, raw.sport),
            remote: SocketAddr::new(remote_ip, raw.dport),
            old: TcpState::try_from(raw.oldstate)?,
            new: TcpState::try_from(raw.newstate)?,
            task: Task {
                pid: raw.tgid,
                tid: raw.tid,
                comm: raw.comm,
            },
        })
    }

    /// Whether a system call on the socket made this transition, so that the current task is the
    /// socket's owner. The others are driven by an arriving segment (softirq, on the stack of
    /// whichever task happened to be running: on loopback, often the peer) or by a timer.
    ///
    /// - `CLOSE -> SYN_SENT`: `connect()` (`tcp_v4_connect`/`tcp_v6_connect`).
    /// - `CLOSE -> LISTEN`: `listen()` (`inet_csk_listen_start`).
    /// - `LISTEN -> CLOSE`: `close()`/`shutdown()` of a listener (`tcp_close`, `tcp_disconnect`).
    /// - `ESTABLISHED -> FIN_WAIT1`, `CLOSE_WAIT -> LAST_ACK`: `close()`/`shutdown()`
    ///   (`tcp_close_state` via `tcp_close` or `tcp_shutdown`).
    pub fn made_by_syscall(&self) -> bool {
        use TcpState::*;
        matches!(
            (self.old, self.new),
            (Close, SynSent)
                | (Close, Listen)
                | (Listen, Close)
                | (Established, FinWait1)
                | (CloseWait, LastAck)
        )
    }

    /// The socket's owning task, when this transition reveals it.
    pub fn owner(&self) -> Option<&Task> {
        self.made_by_syscall().then_some(&self.task)
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
            _pad: [0; 2],
            comm,
        }
    }

    fn bytes(raw: &TransitionEvent) -> Vec<u8> {
        // SAFETY: `TransitionEvent` is plain old data of exactly this size.
        unsafe {
            std::slice::from_raw_parts(
                (raw as *const TransitionEvent).cast::<u8>(),
                TRANSITION_EVENT_SIZE,
            )
        }
        .to_vec()
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
}
