//! When each live socket entered its current state: what turns a transition into "time spent in
//! the old state". Pure: transitions in, durations out.

use std::collections::{HashMap, hash_map::Entry};

use crate::event::{TcpState, Transition};

/// Default cap on the number of sockets followed at once.
pub const DEFAULT_MAX_SOCKETS: usize = 256 * 1024;

#[derive(Debug)]
pub struct SocketStates {
    entered: HashMap<u64, (TcpState, u64)>,
    max_sockets: usize,
    untracked: u64,
}

impl SocketStates {
    pub fn new(max_sockets: usize) -> Self {
        Self {
            entered: HashMap::new(),
            max_sockets,
            untracked: 0,
        }
    }

    /// Records `t` and returns the time the socket spent in `t.old`, if this table saw it enter
    /// that state. A socket first seen mid-life, or whose previous transition was lost, gets
    /// `None`, never a made-up duration.
    pub fn observe(&mut self, t: &Transition) -> Option<u64> {
        // A socket leaves the table when it reaches CLOSE: its address may be reused by the next
        // socket the kernel allocates, which must not inherit this one's history.
        if t.new == TcpState::Close {
            return match self.entered.remove(&t.skaddr) {
                Some((state, since)) if state == t.old => t.ts_ns.checked_sub(since),
                _ => None,
            };
        }
        let len = self.entered.len();
        match self.entered.entry(t.skaddr) {
            Entry::Occupied(mut slot) => {
                let (state, since) = slot.insert((t.new, t.ts_ns));
                (state == t.old)
                    .then(|| t.ts_ns.checked_sub(since))
                    .flatten()
            }
            Entry::Vacant(slot) => {
                if len < self.max_sockets {
                    slot.insert((t.new, t.ts_ns));
                } else {
                    self.untracked += 1;
                }
                None
            }
        }
    }

    /// Transitions of sockets that could not be followed because the table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    pub fn len(&self) -> usize {
        self.entered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entered.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Family, Task};
    use TcpState::*;

    fn t(skaddr: u64, ts_ns: u64, old: TcpState, new: TcpState) -> Transition {
        Transition {
            ts_ns,
            skaddr,
            family: Family::Ipv4,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            old,
            new,
            task: Task::new(1, 1, "test"),
            placement: crate::event::Placement::default(),
        }
    }

    #[test]
    fn times_each_state_seen_entered() {
        let mut s = SocketStates::new(16);
        assert_eq!(s.observe(&t(1, 100, Close, SynSent)), None);
        assert_eq!(s.observe(&t(1, 150, SynSent, Established)), Some(50));
        assert_eq!(s.observe(&t(1, 1_150, Established, CloseWait)), Some(1_000));
        assert_eq!(s.observe(&t(1, 1_350, CloseWait, LastAck)), Some(200));
        assert_eq!(s.observe(&t(1, 1_360, LastAck, Close)), Some(10));
        assert!(s.is_empty());
    }

    #[test]
    fn mid_life_and_gaps_are_blank_not_zero() {
        let mut s = SocketStates::new(16);
        // First seen mid-life.
        assert_eq!(s.observe(&t(1, 100, Established, FinWait1)), None);
        // A lost FIN_WAIT1 -> FIN_WAIT2: the recorded state does not match `old`.
        assert_eq!(s.observe(&t(1, 300, FinWait2, Close)), None);
    }

    #[test]
    fn reused_address_starts_a_new_life() {
        let mut s = SocketStates::new(16);
        s.observe(&t(1, 100, Close, SynSent));
        s.observe(&t(1, 200, SynSent, Close));
        // Same kernel address, new socket.
        assert_eq!(s.observe(&t(1, 900, Close, SynSent)), None);
        assert_eq!(s.observe(&t(1, 950, SynSent, Established)), Some(50));
    }

    #[test]
    fn full_table_counts_what_it_cannot_follow() {
        let mut s = SocketStates::new(1);
        s.observe(&t(1, 100, Close, SynSent));
        assert_eq!(s.observe(&t(2, 100, Close, SynSent)), None);
        assert_eq!(s.observe(&t(2, 150, SynSent, Established)), None);
        assert_eq!(s.untracked(), 2);
        assert_eq!(s.observe(&t(1, 150, SynSent, Established)), Some(50));
    }

    #[test]
    fn clock_going_backwards_gives_no_duration() {
        let mut s = SocketStates::new(4);
        s.observe(&t(1, 500, Close, SynSent));
        assert_eq!(s.observe(&t(1, 400, SynSent, Established)), None);
    }
}
