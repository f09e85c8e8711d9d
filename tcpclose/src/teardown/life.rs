//! A connection's life as the engine follows it, from its first transition to its end: kept
//! compact (every followed socket holds one), advanced by each transition, finished into a
//! [`Teardown`].

use std::{
    hash::{Hash, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use super::{CloseKind, FinRetransmits, Phase, Phases, Reset, Side, Teardown};
use crate::event::{Family, Placement, Task, TcpState, Transition};

/// A kernel time (CLOCK_MONOTONIC ns) that may be unknown, in the 8 bytes of the time where an
/// `Option<u64>` takes 16: unknown is `u64::MAX`, which that clock does not reach (584 years of
/// uptime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MaybeNs(u64);

impl MaybeNs {
    pub(super) const UNKNOWN: Self = Self(u64::MAX);

    pub(super) fn at(ns: u64) -> Self {
        Self(ns)
    }

    pub(super) fn get(self) -> Option<u64> {
        (self != Self::UNKNOWN).then_some(self.0)
    }

    pub(super) fn is_known(self) -> bool {
        self != Self::UNKNOWN
    }

    pub(super) fn take(&mut self) -> Option<u64> {
        std::mem::replace(self, Self::UNKNOWN).get()
    }
}

/// A connection's 4-tuple and network namespace as the engine keeps them: 44 bytes where two
/// `SocketAddr`s alone take 64 (an IPv4 address in the first 4 of its 16 bytes). The kernel's
/// records carry neither IPv6 flow label nor scope id (the decoder and sock_diag leave them 0),
/// so nothing is lost. The namespace is part of it: containers reuse addresses (127.0.0.1 in
/// each), so the same 4-tuple can be two connections at once in two namespaces, and a timewait
/// socket must be matched with the full socket of its own namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tuple {
    local_ip: [u8; 16],
    remote_ip: [u8; 16],
    /// Inode number of the network namespace; 0 where the kernel gives none (every source gives
    /// the same: the kernel programs and sock_diag's namespaces).
    netns: u32,
    local_port: u16,
    remote_port: u16,
    /// Bit 0: the local address is IPv6; bit 1: the remote one.
    ipv6: u8,
}

impl Hash for Tuple {
    // Hashed in three words rather than byte slices with their lengths: a lookup per event.
    // The namespace's top bits fall off the last word: equal tuples still hash alike.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from_ne_bytes(self.local_ip));
        state.write_u128(u128::from_ne_bytes(self.remote_ip));
        state.write_u64(
            u64::from(self.local_port)
                | u64::from(self.remote_port) << 16
                | u64::from(self.ipv6) << 32
                | u64::from(self.netns) << 34,
        );
    }
}

impl Tuple {
    pub(super) fn new(local: &SocketAddr, remote: &SocketAddr, netns: u32) -> Self {
        fn bytes(ip: IpAddr) -> ([u8; 16], u8) {
            match ip {
                IpAddr::V4(v4) => {
                    let mut out = [0; 16];
                    out[..4].copy_from_slice(&v4.octets());
                    (out, 0)
                }
                IpAddr::V6(v6) => (v6.octets(), 1),
            }
        }
        let (local_ip, local_v6) = bytes(local.ip());
        let (remote_ip, remote_v6) = bytes(remote.ip());
        Self {
            local_ip,
            remote_ip,
            netns,
            local_port: local.port(),
            remote_port: remote.port(),
            ipv6: local_v6 | remote_v6 << 1,
        }
    }

    pub(super) fn netns(&self) -> u32 {
        self.netns
    }

    pub(super) fn local(&self) -> SocketAddr {
        Self::addr(&self.local_ip, self.local_port, self.ipv6 & 1 != 0)
    }

    pub(super) fn remote(&self) -> SocketAddr {
        Self::addr(&self.remote_ip, self.remote_port, self.ipv6 & 2 != 0)
    }

    fn addr(ip: &[u8; 16], port: u16, ipv6: bool) -> SocketAddr {
        let ip = if ipv6 {
            IpAddr::V6(Ipv6Addr::from(*ip))
        } else {
            IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
        };
        SocketAddr::new(ip, port)
    }
}

/// A connection's life so far. Every followed socket holds one (in a
/// [`Handoff`](super::timewait::Handoff) once on its timewait socket), so it is kept compact:
/// see [`MaybeNs`], [`Tuple`], [`Phases`].
#[derive(Clone, Debug)]
pub(super) struct Life {
    pub(super) tuple: Tuple,
    pub(super) family: Family,
    pub(super) side: Option<Side>,
    pub(super) complete: bool,
    /// Its TCP state; once handed to a timewait socket, the timewait socket's substate as last
    /// seen: FIN_WAIT2 (orphaned, the peer's FIN is still to come) or TIME_WAIT.
    pub(super) state: TcpState,
    /// `since_ns` is when tcpclose first saw it in `state`, which it may have entered earlier.
    pub(super) since_is_lower_bound: bool,
    pub(super) close: Option<CloseKind>,
    pub(super) born_ns: MaybeNs,
    /// When it entered `state`, if seen. Every transition changes the state, so this is also its
    /// last event, which the eviction of the idlest goes by (a followed full socket has seen at
    /// least one: it is known there).
    pub(super) since_ns: MaybeNs,
    pub(super) teardown_start_ns: MaybeNs,
    /// When it was last reported hung in its current phase.
    pub(super) hung_at_ns: MaybeNs,
    pub(super) phases: Phases,
    pub(super) owner: Option<Task>,
    /// Its cgroup's id, as its transitions carry it (its network namespace is in `tuple`).
    pub(super) cgroup: u64,
    /// The reset that ended it, once seen.
    pub(super) reset: Option<Reset>,
    pub(super) fin_retransmits: FinRetransmits,
}

impl Life {
    /// A socket first seen mid-life: what it did before is unknown.
    pub(super) fn first_seen(t: &Transition) -> Self {
        Self {
            tuple: Tuple::new(&t.local, &t.remote, t.placement.netns),
            family: t.family,
            side: None,
            complete: false,
            state: t.old,
            since_is_lower_bound: false,
            close: None,
            born_ns: MaybeNs::UNKNOWN,
            since_ns: MaybeNs::UNKNOWN,
            teardown_start_ns: MaybeNs::UNKNOWN,
            hung_at_ns: MaybeNs::UNKNOWN,
            phases: Phases::default(),
            owner: None,
            cgroup: t.placement.cgroup,
            reset: None,
            fin_retransmits: FinRetransmits::default(),
        }
    }

    /// Its network namespace and cgroup.
    pub(super) fn placement(&self) -> Placement {
        Placement {
            netns: self.tuple.netns(),
            cgroup: self.cgroup,
        }
    }

    /// The teardown phase it is in, since when, and whether that is a lower bound.
    pub(super) fn phase(&self) -> Option<(Phase, u64, bool)> {
        let phase = Phase::of(self.state)?;
        Some((phase, self.since_ns.get()?, self.since_is_lower_bound))
    }

    pub(super) fn advance(&mut self, t: &Transition) {
        use TcpState::*;
        if self.state != t.old {
            // An event was lost: the time in `t.old` is unknown.
            self.complete = false;
            self.since_ns = MaybeNs::UNKNOWN;
        }
        let since = self.since_ns.get();
        if since.is_some_and(|since| t.ts_ns < since) {
            // Left a state before it entered it: records out of timestamp order (each CPU
            // stamps its own with bpf_ktime_get_ns(); the ring buffer keeps the order they were
            // reserved in, which may differ) or hostile input. Whatever the state, the life's
            // durations no longer add up: not seen whole.
            self.complete = false;
        }
        let in_old = since
            .filter(|_| !self.since_is_lower_bound)
            .and_then(|since| t.ts_ns.checked_sub(since));
        if let Some(phase) = Phase::of(t.old) {
            match in_old {
                Some(ns) => self.phases.add(phase, ns),
                None => self.complete = false,
            }
        }
        // connect() reports CLOSE -> SYN_SENT before the local port is chosen.
        let placement = t.placement.or(self.placement());
        if t.local.port() != 0 {
            self.tuple = Tuple::new(&t.local, &t.remote, placement.netns);
        }
        if let Some(owner) = t.owner() {
            self.owner = Some(*owner);
        }
        self.cgroup = placement.cgroup;
        let close = match (t.old, t.new) {
            (Established, FinWait1) | (Established, CloseWait) => {
                self.teardown_start_ns = MaybeNs::at(t.ts_ns);
                Some(if t.new == FinWait1 {
                    CloseKind::Active
                } else {
                    CloseKind::Passive
                })
            }
            (FinWait1, Closing) => Some(CloseKind::Simultaneous),
            (SynSent | SynRecv, Close) => Some(CloseKind::Failed),
            (Established | CloseWait | FinWait1, Close) => {
                if !self.teardown_start_ns.is_known() {
                    self.teardown_start_ns = MaybeNs::at(t.ts_ns);
                }
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
        self.since_ns = MaybeNs::at(t.ts_ns);
        self.since_is_lower_bound = false;
    }

    pub(super) fn finish(self, end_ns: u64) -> Teardown {
        Teardown {
            end_ns,
            family: self.family,
            local: self.tuple.local(),
            remote: self.tuple.remote(),
            side: self.side,
            close: self.close.unwrap_or(CloseKind::Reset),
            phases: self.phases,
            teardown_ns: self
                .teardown_start_ns
                .get()
                .and_then(|start| end_ns.checked_sub(start)),
            lifetime_ns: self.born_ns.get().and_then(|born| end_ns.checked_sub(born)),
            complete: self.complete,
            owner: self.owner,
            placement: self.placement(),
            resolution_ns: None,
            timewait_end: None,
            reset: self.reset,
            fin_retransmits: self.fin_retransmits,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::TcpState::*,
        teardown::{Correlator, Losses, testutil::*, timewait::Handoff},
    };

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
    fn a_handshake_end_left_in_the_kernel_is_no_lost_event() {
        let client = [
            (0, Close, SynSent),
            (100, Established, CloseWait),
            (400, CloseWait, LastAck),
            (401, LastAck, Close),
        ];
        let server = [(0, Listen, SynRecv), (250, Established, Close)];
        let mut c = Correlator::new(64).without_handshake_ends();
        let t = one(feed(&mut c, 1, &client));
        assert_eq!(t.close, CloseKind::Passive);
        assert_eq!(t.side, Some(Side::Client));
        assert_eq!(t.phases.get(Phase::CloseWait), Some(300 * MS));
        assert_eq!(t.teardown_ns, Some(301 * MS));
        assert_eq!(t.lifetime_ns, Some(401 * MS));
        assert!(t.complete, "{t:#?}");
        let t = one(feed(&mut c, 2, &server));
        assert_eq!(t.side, Some(Side::Server));
        assert_eq!(t.close, CloseKind::Reset);
        assert_eq!(t.lifetime_ns, Some(250 * MS));
        assert!(t.complete, "{t:#?}");
        assert_eq!(c.losses(), Losses::default());

        // Fed to a correlator that expects every transition, the same lives each lost one.
        let mut c = Correlator::new(64);
        assert!(!one(feed(&mut c, 1, &client)).complete);
        assert!(!one(feed(&mut c, 2, &server)).complete);
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

    #[test]
    fn followed_sockets_stay_compact() {
        // What a followed socket costs in its table, besides the key: see `Life`.
        assert!(size_of::<Life>() <= 176, "{}", size_of::<Life>());
        assert!(size_of::<Handoff>() <= 200, "{}", size_of::<Handoff>());
        assert!(size_of::<Phases>() == 48);
        assert!(size_of::<Tuple>() <= 44);
        let v6 = |s: &str| s.parse::<SocketAddr>().unwrap();
        for (local, remote) in [
            (v6("10.0.0.1:40000"), v6("10.0.0.2:80")),
            (v6("[2001:db8::1]:40000"), v6("[::ffff:10.0.0.2]:80")),
            (v6("[::1]:1"), v6("127.0.0.1:0")),
        ] {
            let tuple = Tuple::new(&local, &remote, 4_026_531_840);
            assert_eq!(
                (tuple.local(), tuple.remote(), tuple.netns()),
                (local, remote, 4_026_531_840)
            );
        }
        let mut p = Phases::default();
        assert_eq!(p.iter().count(), 0);
        p.add(Phase::LastAck, 0);
        p.add(Phase::FinWait1, 5);
        p.add(Phase::FinWait1, 7);
        assert_eq!(p.get(Phase::FinWait1), Some(12));
        assert_eq!(p.get(Phase::LastAck), Some(0));
        assert_eq!(p.get(Phase::TimeWait), None);
        p.add(Phase::TimeWait, u64::MAX);
        assert!(p.get(Phase::TimeWait).is_some(), "saturates, still present");
        assert_eq!(
            format!("{p:?}"),
            format!(
                "{{\"FIN_WAIT1\": 12, \"TIME_WAIT\": {}, \"LAST_ACK\": 0}}",
                u64::MAX - 1
            )
        );
    }
}
