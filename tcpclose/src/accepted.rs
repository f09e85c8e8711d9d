//! Accepted sockets whose first transition the kernel reported before it knew their peer.
//!
//! On kernels before 6.x (Debian 12's 6.1 among them), `inet_csk_clone_lock()` sets the new child
//! socket's state to SYN_RECV (`inet_sk_set_state()`) before `tcp_v4_syn_recv_sock()` or
//! `tcp_v6_syn_recv_sock()` copies the request's addresses into it: its `LISTEN -> SYN_RECV`
//! carries the listener's ends (remote port 0, and a wildcard local address for a wildcard
//! listener). Newer kernels set the state after. The child's next transition (`SYN_RECV ->
//! ESTABLISHED`, in the same softirq, right after it in the ring) has the real ends: the first is
//! held until then and completed from it. Pure: transitions in, transitions out.

use std::collections::VecDeque;

use crate::event::{TcpState, Transition};

/// How long (kernel time) a transition waits for its socket's next one before it is let go as
/// the kernel gave it. The next one normally follows within microseconds.
pub const HOLD_NS: u64 = 100_000_000;
/// At most this many are held at once (a flood of handshakes that never complete); beyond, the
/// oldest is let go.
const MAX_HELD: usize = 65_536;

/// A transition held back, with the time its socket had spent in `old`.
pub type Held = (Transition, Option<u64>);

#[derive(Debug, Default)]
pub struct AcceptedEnds {
    held: VecDeque<Held>,
}

impl AcceptedEnds {
    /// Whether the kernel reported `t` before it filled in the socket's peer: a TCP socket out of
    /// LISTEN always has a remote port.
    pub fn lacks_peer(t: &Transition) -> bool {
        t.old == TcpState::Listen && t.new == TcpState::SynRecv && t.remote.port() == 0
    }

    /// Holds `t` (one that [`Self::lacks_peer`]) until its socket's next transition. Returns
    /// the oldest held transition if that made too many.
    pub fn hold(&mut self, t: Transition, in_old_ns: Option<u64>) -> Option<Held> {
        self.held.push_back((t, in_old_ns));
        (self.held.len() > MAX_HELD)
            .then(|| self.held.pop_front())
            .flatten()
    }

    /// The held transition of `next`'s socket, if any, with the ends `next` carries.
    pub fn complete(&mut self, next: &Transition) -> Option<Held> {
        if self.held.is_empty() {
            return None;
        }
        let at = self
            .held
            .iter()
            .position(|(t, _)| t.skaddr == next.skaddr)?;
        let (mut t, in_old_ns) = self.held.remove(at)?;
        t.local = next.local;
        t.remote = next.remote;
        Some((t, in_old_ns))
    }

    /// Lets go of what has waited [`HOLD_NS`] or more by kernel time `now_ns` (all of it with
    /// `u64::MAX`), oldest first, as the kernel gave it.
    pub fn expired(&mut self, now_ns: u64) -> impl Iterator<Item = Held> + '_ {
        std::iter::from_fn(move || {
            let (t, _) = self.held.front()?;
            (now_ns.saturating_sub(t.ts_ns) >= HOLD_NS)
                .then(|| self.held.pop_front())
                .flatten()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use super::*;
    use crate::event::{Family, Task};

    fn transition(
        skaddr: u64,
        ts_ns: u64,
        old: TcpState,
        new: TcpState,
        remote: u16,
    ) -> Transition {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Transition {
            ts_ns,
            skaddr,
            family: Family::Ipv4,
            local: SocketAddr::new(ip, 5555),
            remote: SocketAddr::new(
                if remote == 0 {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    ip
                },
                remote,
            ),
            old,
            new,
            task: Task::new(0, 0, ""),
            placement: crate::event::Placement::default(),
        }
    }

    #[test]
    fn an_accepted_socket_gets_its_peer_from_its_next_transition() {
        use TcpState::*;
        let first = transition(1, 10, Listen, SynRecv, 0);
        assert!(AcceptedEnds::lacks_peer(&first));
        let mut accepted = AcceptedEnds::default();
        assert!(accepted.hold(first, None).is_none());
        // Another socket's transition completes nothing.
        assert!(
            accepted
                .complete(&transition(2, 11, SynSent, Established, 5555))
                .is_none()
        );
        let next = transition(1, 12, SynRecv, Established, 40_000);
        let (completed, in_old) = accepted.complete(&next).expect("held");
        assert_eq!(in_old, None);
        assert_eq!(
            (completed.old, completed.new, completed.ts_ns),
            (Listen, SynRecv, 10)
        );
        assert_eq!(completed.remote, next.remote);
        assert_eq!(completed.local, next.local);
        assert!(accepted.is_empty());
    }

    #[test]
    fn a_socket_that_already_knows_its_peer_is_not_held() {
        use TcpState::*;
        assert!(!AcceptedEnds::lacks_peer(&transition(
            1, 10, Listen, SynRecv, 40_000
        )));
        // A listener's own transitions have no peer, rightly.
        assert!(!AcceptedEnds::lacks_peer(&transition(
            1, 10, Close, Listen, 0
        )));
        assert!(!AcceptedEnds::lacks_peer(&transition(
            1, 10, Listen, Close, 0
        )));
    }

    #[test]
    fn what_waits_too_long_is_let_go_as_the_kernel_gave_it() {
        use TcpState::*;
        let mut accepted = AcceptedEnds::default();
        accepted.hold(transition(1, 10, Listen, SynRecv, 0), None);
        accepted.hold(transition(2, 20, Listen, SynRecv, 0), Some(3));
        assert_eq!(accepted.expired(10 + HOLD_NS - 1).count(), 0);
        let gone: Vec<u64> = accepted
            .expired(10 + HOLD_NS)
            .map(|(t, _)| t.skaddr)
            .collect();
        assert_eq!(gone, [1]);
        let gone: Vec<Held> = accepted.expired(u64::MAX).collect();
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].0.skaddr, gone[0].0.remote.port(), gone[0].1),
            (2, 0, Some(3))
        );
        assert!(accepted.is_empty());
    }

    #[test]
    fn a_flood_of_unfinished_handshakes_is_bounded() {
        use TcpState::*;
        let mut accepted = AcceptedEnds::default();
        for i in 0..MAX_HELD as u64 {
            assert!(
                accepted
                    .hold(transition(i, i, Listen, SynRecv, 0), None)
                    .is_none()
            );
        }
        let (oldest, _) = accepted
            .hold(transition(u64::MAX, 0, Listen, SynRecv, 0), None)
            .expect("the oldest let go");
        assert_eq!(oldest.skaddr, 0);
    }
}
