//! What the engine emits: one [`Teardown`] per connection, with the phases it went through
//! timed.

use std::{fmt, net::SocketAddr};

use super::{FinRetransmits, Phase, Reset};
use crate::event::{Family, Placement, Task};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Opened by `connect()`.
    Client,
    /// Accepted child of a listener.
    Server,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseKind {
    /// We sent the first FIN (ESTABLISHED -> FIN_WAIT1).
    Active,
    /// The peer's FIN came first (ESTABLISHED -> CLOSE_WAIT).
    Passive,
    /// Both FINs crossed (FIN_WAIT1 -> CLOSING).
    Simultaneous,
    /// Left a synchronized state for CLOSE without completing the FIN exchange (RST sent or
    /// received, `SO_LINGER` 0, close with unread data).
    Reset,
    /// Never established: SYN_SENT or SYN_RECV -> CLOSE (refused, timed out).
    Failed,
    /// We closed, the peer never sent its FIN: the orphaned FIN_WAIT2 timed out after
    /// `net.ipv4.tcp_fin_timeout`.
    FinTimeout,
}

impl CloseKind {
    pub const ALL: [Self; 6] = [
        Self::Active,
        Self::Passive,
        Self::Simultaneous,
        Self::Reset,
        Self::Failed,
        Self::FinTimeout,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Passive => "passive",
            Self::Simultaneous => "simultaneous",
            Self::Reset => "reset",
            Self::Failed => "failed",
            Self::FinTimeout => "fin_timeout",
        }
    }

    /// The phases every connection that closes this way goes through. Reset and failed
    /// connections have no fixed set: a reset may end any phase.
    pub const fn phases(self) -> &'static [Phase] {
        match self {
            Self::Active => &[Phase::FinWait1, Phase::FinWait2, Phase::TimeWait],
            Self::Passive => &[Phase::CloseWait, Phase::LastAck],
            Self::Simultaneous => &[Phase::FinWait1, Phase::Closing, Phase::TimeWait],
            Self::FinTimeout => &[Phase::FinWait1, Phase::FinWait2],
            Self::Reset | Self::Failed => &[],
        }
    }
}

/// Duration of each phase a connection went through; absent where it did not pass or where
/// tcpclose did not see it whole.
///
/// Kept in 48 bytes (every followed socket holds one): an absent phase is `u64::MAX`, a duration
/// no phase reaches (584 years); [`Phases::add`] stops just short of it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Phases([u64; 6]);

impl Default for Phases {
    fn default() -> Self {
        Self([Self::ABSENT; 6])
    }
}

impl fmt::Debug for Phases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.iter().map(|(phase, ns)| (phase.name(), ns)))
            .finish()
    }
}

impl Phases {
    const ABSENT: u64 = u64::MAX;

    pub fn get(&self, phase: Phase) -> Option<u64> {
        let ns = self.0[phase as usize];
        (ns != Self::ABSENT).then_some(ns)
    }

    /// Adds `ns` to `phase` (a connection may pass through a phase more than once).
    pub fn add(&mut self, phase: Phase, ns: u64) {
        let total = self.get(phase).unwrap_or(0).saturating_add(ns);
        self.0[phase as usize] = total.min(Self::ABSENT - 1);
    }

    /// Phases present, in the order of [`Phase::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (Phase, u64)> + '_ {
        Phase::ALL
            .into_iter()
            .filter_map(|p| self.get(p).map(|ns| (p, ns)))
    }
}

/// How a timewait socket ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimewaitEnd {
    /// Its timer fired: TIME_WAIT (or the orphaned FIN_WAIT2) ran its course.
    Expired,
    /// Its timer was cancelled: the kernel killed it early (a new connection reused the 4-tuple,
    /// an RST arrived, or the namespace went away).
    Killed,
}

/// One connection's teardown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Teardown {
    /// When the last phase ended (kernel CLOCK_MONOTONIC ns).
    pub end_ns: u64,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub side: Option<Side>,
    pub close: CloseKind,
    pub phases: Phases,
    /// From leaving ESTABLISHED to the end of the last phase.
    pub teardown_ns: Option<u64>,
    /// From `connect()` or the child's creation to the end.
    pub lifetime_ns: Option<u64>,
    /// Whether tcpclose saw the whole life (from its first state, with no gap).
    pub complete: bool,
    /// The owner, when a system-call transition revealed it.
    pub owner: Option<Task>,
    /// The socket's network namespace and cgroup.
    pub placement: Placement,
    /// Set when a phase was timed from the kernel's jiffies rather than an event timestamp: the
    /// resolution of those phases.
    pub resolution_ns: Option<u64>,
    /// How the timewait socket ended, when there was one.
    pub timewait_end: Option<TimewaitEnd>,
    /// Who reset the connection and why, when it was reset.
    pub reset: Option<Reset>,
    /// Segments retransmitted after the FIN, per phase.
    pub fin_retransmits: FinRetransmits,
}

#[cfg(test)]
impl Teardown {
    /// For tests: a server's `close` of 127.0.0.1:8080 <- 127.0.0.1:40000, held by `app` (pid
    /// 1), through `phases`, seen whole; no other time known.
    pub(crate) fn sample(close: CloseKind, phases: &[(Phase, u64)]) -> Self {
        let mut p = Phases::default();
        for &(phase, ns) in phases {
            p.add(phase, ns);
        }
        Self {
            end_ns: 0,
            family: Family::Ipv4,
            local: SocketAddr::from(([127, 0, 0, 1], 8080)),
            remote: SocketAddr::from(([127, 0, 0, 1], 40000)),
            side: Some(Side::Server),
            close,
            phases: p,
            teardown_ns: None,
            lifetime_ns: None,
            complete: true,
            owner: Some(crate::event::Task::new(1, 1, "app")),
            placement: Placement::default(),
            resolution_ns: None,
            timewait_end: None,
            reset: None,
            fin_retransmits: FinRetransmits::default(),
        }
    }
}
