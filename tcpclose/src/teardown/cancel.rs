//! Timer cancels of timewait sockets, judged by what follows: the kernel detaches a timer
//! before it moves or fires it, so only a cancel that nothing follows is a kill.

use std::{cmp::Reverse, collections::BinaryHeap};

use foldhash::HashMap;

use super::{
    capacity::shrink_sparse,
    life::{Life, Tuple},
};
use crate::event::{TcpState, TimerAction, TimewaitTimer};

/// A timer cancel is followed within microseconds by its queueing again (`__mod_timer()`) or its
/// firing (`expire_timers()`); one not followed within this is a kill.
pub const CANCEL_GRACE_NS: u64 = 10_000_000;

/// Timer cancels of followed timewait sockets, not judged yet: by socket address, and by 4-tuple
/// for the transitions that reveal a kill.
#[derive(Debug, Default)]
pub(super) struct PendingCancels {
    by_addr: HashMap<u64, Cancel>,
    /// The timewait socket with a pending cancel on each 4-tuple, by the 4-tuple's
    /// [`tuple_hash`] (16 bytes an entry, where the tuple itself takes 40).
    by_tuple: HashMap<u64, u64>,
    /// `(ts_ns, twaddr)` of each cancel noted, earliest first, for [`PendingCancels::due`]; an
    /// entry whose cancel was taken since is skipped when it comes up.
    by_time: BinaryHeap<Reverse<(u64, u64)>>,
}

impl PendingCancels {
    pub(super) fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// See [`Correlator::trim`](super::Correlator::trim): `high` is the most cancels pending at
    /// once lately. The queue by time holds those pending, and the taken ones whose time has not
    /// come.
    pub(super) fn shrink_sparse(&mut self, high: usize) {
        shrink_sparse(&mut self.by_addr, high);
        shrink_sparse(&mut self.by_tuple, high);
        if crate::dense::sparse(high, self.by_time.capacity()) {
            self.by_time
                .shrink_to(self.by_time.len().max(high).saturating_mul(2));
        }
    }

    /// Keeps the first cancel of a timewait socket: a kill happens at most once, and a move
    /// re-arms the timer (see [`PendingCancels::take`]) before it can be cancelled again.
    pub(super) fn note(&mut self, ev: &TimewaitTimer) {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.by_addr.entry(ev.twaddr) {
            let cancel = Cancel::of(ev);
            slot.insert(cancel);
            self.by_tuple.insert(cancel.tuple_hash, ev.twaddr);
            if self.by_time.len() > 2 * self.by_addr.len() + 64 {
                // Mostly taken cancels whose time has not come (a clock that jumped ahead):
                // rebuilt from those pending, so that it stays bounded by them.
                self.by_time = self
                    .by_addr
                    .iter()
                    .map(|(twaddr, cancel)| Reverse((cancel.ts_ns, *twaddr)))
                    .collect();
            } else {
                self.by_time.push(Reverse((ev.ts_ns, ev.twaddr)));
            }
        }
    }

    pub(super) fn get(&self, twaddr: u64) -> Option<Cancel> {
        self.by_addr.get(&twaddr).copied()
    }

    pub(super) fn take(&mut self, twaddr: u64) -> Option<Cancel> {
        let cancel = self.by_addr.remove(&twaddr)?;
        if self.by_tuple.get(&cancel.tuple_hash) == Some(&twaddr) {
            self.by_tuple.remove(&cancel.tuple_hash);
        }
        Some(cancel)
    }

    /// The timewait socket on `tuple` with a pending cancel, if any.
    pub(super) fn on_tuple(&self, tuple: &Tuple) -> Option<u64> {
        let hash = tuple_hash(tuple);
        let twaddr = *self.by_tuple.get(&hash)?;
        // Another 4-tuple with the same hash: the socket's own cancel says.
        (self.by_addr.get(&twaddr)?.tuple_hash == hash).then_some(twaddr)
    }

    /// Up to `max` timewait sockets cancelled before `ns`, the earliest first; each is left
    /// pending until taken.
    pub(super) fn due(&mut self, ns: u64, max: usize) -> Vec<u64> {
        let mut due = Vec::new();
        while due.len() < max {
            let Some(&Reverse((ts_ns, twaddr))) = self.by_time.peek() else {
                break;
            };
            if ts_ns >= ns {
                break;
            }
            self.by_time.pop();
            // Still pending, and this very cancel (not a later one of a reused address).
            if self
                .by_addr
                .get(&twaddr)
                .is_some_and(|ev| ev.ts_ns == ts_ns)
            {
                due.push(twaddr);
            }
        }
        due
    }

    /// Whether a pending cancel is older than `ns`.
    pub(super) fn any_due(&self, ns: u64) -> bool {
        self.by_time
            .peek()
            .is_some_and(|Reverse((ts_ns, _))| *ts_ns < ns)
    }
}

/// A pending cancel of a timewait socket's timer: what ending the socket at it takes, 32 bytes
/// where the whole timer event took 104 (a namespace's deletion leaves 131,072 of them).
#[derive(Clone, Copy, Debug)]
pub(super) struct Cancel {
    pub(super) ts_ns: u64,
    expires_ns: u64,
    /// [`tuple_hash`] of the socket's 4-tuple.
    tuple_hash: u64,
    jiffy_ns: u32,
    substate: TcpState,
}

const _: () = assert!(std::mem::size_of::<Cancel>() == 32);

impl Cancel {
    pub(super) fn of(ev: &TimewaitTimer) -> Self {
        Self {
            ts_ns: ev.ts_ns,
            expires_ns: ev.expires_ns,
            tuple_hash: tuple_hash(&Tuple::new(&ev.local, &ev.remote, ev.netns)),
            jiffy_ns: u32::try_from(ev.jiffy_ns).unwrap_or(u32::MAX),
            substate: ev.substate,
        }
    }

    /// The cancel as the timer event it was, on the socket `twaddr` with these ends.
    pub(super) fn timer(&self, twaddr: u64, life: &Life) -> TimewaitTimer {
        TimewaitTimer {
            ts_ns: self.ts_ns,
            twaddr,
            family: life.family,
            local: life.tuple.local(),
            remote: life.tuple.remote(),
            substate: self.substate,
            action: TimerAction::Cancelled,
            expires_ns: self.expires_ns,
            jiffy_ns: u64::from(self.jiffy_ns),
            netns: life.tuple.netns(),
        }
    }
}

/// A 4-tuple's hash, fixed for the run: the key of [`PendingCancels::by_tuple`].
fn tuple_hash(tuple: &Tuple) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0x7463_7063_6c6f_7365).hash_one(tuple)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::{
        event::{Family, TcpState::*},
        teardown::testutil::*,
    };

    /// A namespace going away leaves 131,072 pending kills at once: once they are ended, the maps
    /// keep their room while the flood is recent, and give it back after.
    #[test]
    fn pending_cancels_give_memory_back_once_a_flood_is_over() {
        let mut cancels = PendingCancels::default();
        let cancel = |n: u64| TimewaitTimer {
            ts_ns: n,
            twaddr: 0x10_000 + n,
            family: Family::Ipv4,
            local: SocketAddr::new([10, 0, (n >> 8) as u8, n as u8].into(), 1_000),
            remote: SERVER.parse().unwrap(),
            substate: TimeWait,
            action: TimerAction::Cancelled,
            expires_ns: 60_000 * MS,
            jiffy_ns: 4 * MS,
            netns: 0,
        };
        for n in 0..20_000 {
            cancels.note(&cancel(n));
        }
        let room = |c: &PendingCancels| {
            [
                c.by_addr.capacity(),
                c.by_tuple.capacity(),
                c.by_time.capacity(),
            ]
        };
        let full = room(&cancels);
        assert!(full.iter().all(|&n| n >= 20_000), "{full:?}");
        assert_eq!(cancels.due(u64::MAX, usize::MAX).len(), 20_000);
        for n in 0..20_000 {
            assert!(cancels.take(0x10_000 + n).is_some());
        }
        // A hash map's room as reported counts out the tombstones of its removals, which depend
        // on the hasher's random seed: what is checked is that the room is not reallocated.
        let emptied = room(&cancels);
        cancels.shrink_sparse(20_000);
        assert_eq!(room(&cancels), emptied, "held 20,000 lately: kept");
        cancels.shrink_sparse(0);
        assert!(
            room(&cancels).iter().all(|&n| n < 4_096),
            "{:?}",
            room(&cancels)
        );
    }
}
