//! `--events`: every state change, as it happens.

use std::io;

use super::{FirstError, Pipeline};
use crate::{
    accepted::AcceptedEnds,
    event::{TcpState, TimewaitTimer, Transition},
    render::{EventPrinter, Format, Summary, WallClock},
    settings::owner_passes,
    states::SocketStates,
};

/// Prints every transition, with the time the socket spent in its old state.
pub struct Events {
    states: SocketStates,
    printer: EventPrinter,
    /// Accepted sockets' first transitions, held until their peer is known.
    accepted: AcceptedEnds,
    /// `--pid`: only these owners' sockets (all when empty).
    pids: Vec<u32>,
    /// With `--pid`, the owner of each socket whose system-call transition named it, until it
    /// closes (bounded like the state table).
    owners: foldhash::HashMap<u64, u32>,
    max_sockets: usize,
}

impl Events {
    pub fn new(format: Format, max_sockets: usize) -> Self {
        Self {
            states: SocketStates::new(max_sockets),
            printer: EventPrinter::new(format, WallClock::now()),
            accepted: AcceptedEnds::default(),
            pids: Vec::new(),
            owners: foldhash::HashMap::default(),
            max_sockets,
        }
    }

    /// Prints only the transitions of sockets these processes own (`--pid`; all when empty):
    /// known from the socket's last system-call transition (connect, listen, close, shutdown).
    pub fn owned_by(mut self, pids: Vec<u32>) -> Self {
        self.pids = pids;
        self
    }

    /// Whether `t`'s socket passes `--pid`, remembering its owner when `t` names it.
    fn owner_passes(&mut self, t: &Transition) -> bool {
        if self.pids.is_empty() {
            return true;
        }
        let owner = match t.owner() {
            Some(task) => {
                if t.new != TcpState::Close && self.owners.len() < self.max_sockets {
                    self.owners.insert(t.skaddr, task.pid);
                }
                Some(task.pid)
            }
            None => self.owners.get(&t.skaddr).copied(),
        };
        if t.new == TcpState::Close {
            self.owners.remove(&t.skaddr);
        }
        owner_passes(&self.pids, owner)
    }

    /// Names the sockets' cgroups, containers and pods with `cgroups`.
    pub fn with_cgroups(mut self, cgroups: crate::cgroups::Cgroups) -> Self {
        self.printer = self.printer.with_cgroups(cgroups);
        self
    }

    /// Prints the accepted sockets' first transitions that waited for their peer until kernel
    /// time `now_ns` (see [`AcceptedEnds`]) as the kernel gave them.
    fn release_accepted(&mut self, now_ns: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let mut result = FirstError::default();
        for (t, ns) in self.accepted.expired(now_ns) {
            result.print(|| self.printer.print(out, &t, ns));
        }
        result.into_result()
    }
}

impl Pipeline for Events {
    fn on_transition(&mut self, t: &Transition, out: &mut Vec<u8>) -> io::Result<()> {
        let in_old_ns = self.states.observe(t);
        if !self.owner_passes(t) {
            return Ok(());
        }
        if AcceptedEnds::lacks_peer(t) {
            return match self.accepted.hold(*t, in_old_ns) {
                Some((oldest, ns)) => self.printer.print(out, &oldest, ns),
                None => Ok(()),
            };
        }
        if let Some((first, ns)) = self.accepted.complete(t) {
            self.printer.print(out, &first, ns)?;
        }
        self.printer.print(out, t, in_old_ns)
    }

    /// The timer programs are not attached in this mode.
    fn on_timewait(&mut self, _timer: &TimewaitTimer, _out: &mut Vec<u8>) -> io::Result<()> {
        Ok(())
    }

    fn expire(&mut self, now_ns: u64, out: &mut Vec<u8>) -> (bool, io::Result<()>) {
        (false, self.release_accepted(now_ns, out))
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.release_accepted(u64::MAX, out)
    }

    fn fill_summary(&self, summary: &mut Summary) {
        summary.untracked = self.states.untracked();
    }
}
