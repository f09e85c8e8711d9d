//! What the benchmarks share: kernel records as the ring buffer carries them, and the event
//! sequences of whole connections.
#![allow(dead_code)] // Each benchmark uses a part.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use tcpclose::{
    event::{Family, Task, TcpState, TimerAction, TimewaitTimer, Transition},
    teardown::{Correlator, Teardown},
};
use tcpclose_common::{AF_INET, TimewaitEvent, TransitionEvent, record_kind, timer_action};

pub const MS: u64 = 1_000_000;
pub const S: u64 = 1_000 * MS;
/// One jiffy at HZ=250.
pub const JIFFY_NS: u64 = 4 * MS;

/// The bytes of a ring buffer record, as the kernel program writes them.
pub fn bytes<T: aya::Pod>(raw: &T) -> Vec<u8> {
    tcpclose_common::record_bytes::of(raw).to_vec()
}

fn comm(name: &str) -> [u8; 16] {
    let mut comm = [0; 16];
    comm[..name.len()].copy_from_slice(name.as_bytes());
    comm
}

fn octets(addr: &SocketAddr) -> [u8; 16] {
    let mut out = [0; 16];
    match addr {
        SocketAddr::V4(a) => out[..4].copy_from_slice(&a.ip().octets()),
        SocketAddr::V6(a) => out = a.ip().octets(),
    }
    out
}

/// The kernel record of `t` (IPv4).
pub fn raw_transition(t: &Transition) -> TransitionEvent {
    TransitionEvent {
        kind: record_kind::TRANSITION,
        _pad: 0,
        family: AF_INET,
        sport: t.local.port(),
        dport: t.remote.port(),
        ts_ns: t.ts_ns,
        skaddr: t.skaddr,
        saddr: octets(&t.local),
        daddr: octets(&t.remote),
        tid: t.task.tid,
        tgid: t.task.pid,
        oldstate: t.old as i32,
        newstate: t.new as i32,
        comm: comm("curl"),
        _pad2: 0,
        cgroup: 0,
        netns: 0,
    }
}

/// The kernel record of `ev` (IPv4), with jiffies counted from 0 at `ts_ns` 0.
pub fn raw_timewait(ev: &TimewaitTimer) -> TimewaitEvent {
    TimewaitEvent {
        kind: record_kind::TIMEWAIT,
        action: match ev.action {
            TimerAction::Armed => timer_action::START,
            TimerAction::Fired => timer_action::EXPIRE,
            TimerAction::Cancelled => timer_action::CANCEL,
        },
        family: AF_INET,
        sport: ev.local.port(),
        dport: ev.remote.port(),
        substate: ev.substate as u8,
        _pad: [0; 3],
        ts_ns: ev.ts_ns,
        jiffies: ev.ts_ns / JIFFY_NS,
        twaddr: ev.twaddr,
        expires: ev.expires_ns / JIFFY_NS,
        saddr: octets(&ev.local),
        daddr: octets(&ev.remote),
        netns: 0,
    }
}

/// One event of a connection, decoded.
#[derive(Clone, Copy, Debug)]
pub enum Event {
    Transition(Transition),
    Timewait(TimewaitTimer),
}

impl Event {
    pub fn feed(&self, c: &mut Correlator, out: &mut Vec<Teardown>) {
        match self {
            Self::Transition(t) => c.on_transition(t, out),
            Self::Timewait(ev) => c.on_timewait(ev, out),
        }
    }

    /// The record the kernel would have written.
    pub fn record(&self) -> Vec<u8> {
        match self {
            Self::Transition(t) => bytes(&raw_transition(t)),
            Self::Timewait(ev) => bytes(&raw_timewait(ev)),
        }
    }
}

/// Connection number `n`: its kernel addresses and 4-tuple, distinct for each `n` below 2^24.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub skaddr: u64,
    pub twaddr: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Conn {
    pub fn new(n: u32) -> Self {
        // Sockets come from a slab: 2 KiB apart, in the direct map.
        let skaddr = 0xffff_8880_0000_0000 + u64::from(n) * 0x800;
        let twaddr = 0xffff_8881_0000_0000 + u64::from(n) * 0x100;
        let local = SocketAddrV4::new(
            Ipv4Addr::new(10, 0, (n >> 16) as u8, (n >> 8) as u8),
            32_768 + (n & 0xff) as u16,
        );
        let remote = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 443);
        Self {
            skaddr,
            twaddr,
            local: local.into(),
            remote: remote.into(),
        }
    }

    fn transition(&self, ts_ns: u64, old: TcpState, new: TcpState) -> Event {
        Event::Transition(Transition {
            ts_ns,
            skaddr: self.skaddr,
            family: Family::Ipv4,
            local: self.local,
            remote: self.remote,
            old,
            new,
            task: Task::new(4242, 4243, "curl"),
            placement: tcpclose::event::Placement::default(),
        })
    }

    fn timer(&self, ts_ns: u64, action: TimerAction, expires_ns: u64) -> Event {
        self.timer_in(TcpState::TimeWait, ts_ns, action, expires_ns)
    }

    fn timer_in(
        &self,
        substate: TcpState,
        ts_ns: u64,
        action: TimerAction,
        expires_ns: u64,
    ) -> Event {
        Event::Timewait(TimewaitTimer {
            ts_ns,
            twaddr: self.twaddr,
            family: Family::Ipv4,
            local: self.local,
            remote: self.remote,
            substate,
            action,
            expires_ns,
            jiffy_ns: JIFFY_NS,
            netns: 0,
        })
    }

    /// An active close by a client, in the kernel's order: connect, established, close, the
    /// peer's ACK and FIN; tcp_time_wait() arms the timewait socket's timer before tcp_done()
    /// reports FIN_WAIT2 -> CLOSE; the timer fires 60 s later.
    pub fn client(&self, t0: u64) -> [Event; 7] {
        use TcpState::*;
        let fin = t0 + 100 * MS + 2 * MS;
        [
            self.transition(t0, Close, SynSent),
            self.transition(t0 + MS, SynSent, Established),
            self.transition(t0 + 100 * MS, Established, FinWait1),
            self.transition(t0 + 100 * MS + MS, FinWait1, FinWait2),
            self.timer(fin, TimerAction::Armed, fin + 60 * S),
            self.transition(fin, FinWait2, Close),
            self.timer(fin + 60 * S, TimerAction::Fired, fin + 60 * S),
        ]
    }

    /// A client's close that the peer does not answer with its FIN: FIN_WAIT2 goes on, orphaned,
    /// on the timewait socket until tcp_fin_timeout (60 s); it ends there.
    pub fn orphan(&self, t0: u64) -> [Event; 6] {
        use TcpState::*;
        let ack = t0 + 100 * MS + MS;
        [
            self.transition(t0, Close, SynSent),
            self.transition(t0 + MS, SynSent, Established),
            self.transition(t0 + 100 * MS, Established, FinWait1),
            self.transition(ack, FinWait1, FinWait2),
            self.timer_in(FinWait2, ack, TimerAction::Armed, ack + 60 * S),
            self.transition(ack, FinWait2, Close),
        ]
    }

    /// A simultaneous close: both FINs cross, CLOSING until the last ACK.
    pub fn simultaneous(&self, t0: u64) -> [Event; 4] {
        use TcpState::*;
        [
            self.transition(t0, Close, SynSent),
            self.transition(t0 + MS, SynSent, Established),
            self.transition(t0 + 100 * MS, Established, FinWait1),
            self.transition(t0 + 100 * MS, FinWait1, Closing),
        ]
    }

    /// A passive close by a server's child: the peer closes first.
    pub fn server(&self, t0: u64) -> [Event; 5] {
        use TcpState::*;
        [
            self.transition(t0, Listen, SynRecv),
            self.transition(t0 + MS, SynRecv, Established),
            self.transition(t0 + 100 * MS, Established, CloseWait),
            self.transition(t0 + 101 * MS, CloseWait, LastAck),
            self.transition(t0 + 102 * MS, LastAck, Close),
        ]
    }
}

/// Puts `n` sockets into `c`, all begun at `t0` and none finished: half of them clients in
/// ESTABLISHED, a quarter server children in CLOSE_WAIT (a watched phase), a quarter in
/// TIME_WAIT on their timewait socket. Their numbers are `0..n`.
pub fn populate(c: &mut Correlator, n: u32, t0: u64) {
    let mut out = Vec::new();
    for i in 0..n {
        let conn = Conn::new(i);
        let events: &[Event] = match i % 4 {
            0 | 1 => &conn.client(t0)[..2],
            2 => &conn.server(t0)[..3],
            _ => &conn.client(t0)[..6],
        };
        for ev in events {
            ev.feed(c, &mut out);
        }
    }
    assert!(out.is_empty(), "{out:#?}");
    assert_eq!(c.len(), n as usize);
}

/// Puts `n` sockets into `c`, all in a teardown phase, begun at `t0` and none finished: half
/// full sockets (FIN_WAIT1, FIN_WAIT2 after a half close, CLOSING, CLOSE_WAIT, LAST_ACK), half
/// on their timewait socket (four in five in TIME_WAIT, one an orphaned FIN_WAIT2). Their numbers
/// are `0..n`.
pub fn populate_teardowns(c: &mut Correlator, n: u32, t0: u64) {
    let mut out = Vec::new();
    for i in 0..n {
        let conn = Conn::new(i);
        let events: &[Event] = match i % 10 {
            0 => &conn.client(t0)[..3],
            1 => &conn.client(t0)[..4],
            2 => &conn.simultaneous(t0),
            3 => &conn.server(t0)[..3],
            4 => &conn.server(t0)[..4],
            5..=8 => &conn.client(t0)[..6],
            _ => &conn.orphan(t0),
        };
        for ev in events {
            ev.feed(c, &mut out);
        }
    }
    assert!(out.is_empty(), "{out:#?}");
    assert_eq!(c.len(), n as usize);
}
