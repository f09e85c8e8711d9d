//! Hung teardowns: sockets that have stayed in a teardown state longer than its threshold and are
//! still there. The correlation engine finds them ([`crate::teardown::Correlator::poll_hung`]);
//! this module holds the thresholds, the alerts and the leak view. Pure, like the engine.

use std::{fmt, net::SocketAddr, time::Duration};

use crate::{
    event::{Family, Placement, Task},
    phase::Phase,
};

/// A process holding a socket, as `/proc/<pid>/fd` shows it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
}

/// How long a socket may stay in each teardown phase before it is reported; `None`: not watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds([Option<u64>; 6]);

impl Thresholds {
    /// Nothing watched.
    pub const NONE: Thresholds = Thresholds([None; 6]);

    /// Defaults for production: longer than any healthy teardown takes, short enough to catch a
    /// leak while it builds up. CLOSE_WAIT is up to the application (a healthy one closes within
    /// a request's time); FIN_WAIT1, CLOSING and LAST_ACK wait on the peer's ACK and end by
    /// retransmission timeout within about 2 minutes (tcp_orphan_retries); FIN_WAIT2 of an
    /// orphan ends after tcp_fin_timeout (60 s by default); TIME_WAIT always lasts 60 s, so it is
    /// not watched unless asked for.
    pub const DEFAULT: Thresholds = Thresholds([
        Some(30_000_000_000), // FIN_WAIT1
        Some(90_000_000_000), // FIN_WAIT2
        Some(30_000_000_000), // CLOSING
        None,                 // TIME_WAIT
        Some(60_000_000_000), // CLOSE_WAIT
        Some(30_000_000_000), // LAST_ACK
    ]);

    pub fn get(&self, phase: Phase) -> Option<u64> {
        self.0[phase as usize]
    }

    pub fn set(&mut self, phase: Phase, ns: Option<u64>) {
        self.0[phase as usize] = ns;
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// How often the engine looks for hung sockets, so that a report comes at most this late:
    /// a tenth of the shortest threshold, within [`SWEEP_MIN_NS`] and [`SWEEP_MAX_NS`].
    pub fn sweep_ns(&self) -> u64 {
        let shortest = self.0.iter().flatten().min().copied().unwrap_or(u64::MAX);
        (shortest / 10).clamp(SWEEP_MIN_NS, SWEEP_MAX_NS)
    }
}

impl fmt::Display for Thresholds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for phase in Phase::ALL {
            if let Some(ns) = self.get(phase) {
                if !first {
                    f.write_str(", ")?;
                }
                first = false;
                write!(f, "{}={:?}", phase.name(), Duration::from_nanos(ns))?;
            }
        }
        Ok(())
    }
}

/// Where a followed socket lives in the engine's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SocketKey {
    /// A full socket, by kernel address.
    Full(u64),
    /// A timewait socket, by kernel address.
    Timewait(u64),
    /// A socket found at start-up, by local and remote address and network namespace (its
    /// inode number), until an event reveals it.
    Existing(SocketAddr, SocketAddr, u32),
}

/// What the engine reports about a socket that hangs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub phase: Phase,
    /// When the alert was made (kernel CLOCK_MONOTONIC ns).
    pub ts_ns: u64,
    /// When the socket entered `phase`, as far as tcpclose knows.
    pub since_ns: u64,
    /// Whether the socket was already in `phase` before `since_ns` (first seen there).
    pub since_is_lower_bound: bool,
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The owner, when a system-call transition revealed it.
    pub owner: Option<Task>,
    /// The socket's network namespace and cgroup.
    pub placement: Placement,
    pub key: SocketKey,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// In `phase` for `age_ns` and still there; `again` when it was reported before.
    Hung { age_ns: u64, again: bool },
    /// A socket reported hung has left `phase` after `stuck_ns` in it.
    Resolved { stuck_ns: u64 },
    /// A socket reported hung was dropped from tcpclose's table, full (`--max-sockets`), while
    /// still in `phase`, `age_ns` in: whether and when its hang ends is no longer seen.
    Evicted { age_ns: u64 },
}

/// A still-hung socket is reported again every so often, never more often than this.
pub const REPORT_AGAIN_NS: u64 = 60_000_000_000;

/// The engine looks for hung sockets at most this often ([`Thresholds::sweep_ns`]): thresholds
/// of a second or two are reported within a fifth of a second.
pub const SWEEP_MIN_NS: u64 = 200_000_000;

/// The engine looks for hung sockets at least this often ([`Thresholds::sweep_ns`]), however
/// long the thresholds.
pub const SWEEP_MAX_NS: u64 = 2_000_000_000;

/// Who leaks: per process (or per container, pod, cgroup or namespace) and teardown state, the
/// sockets hung now and the new ones over an interval. Fed with every alert once its owner is
/// known.
#[derive(Debug, Default)]
pub struct LeakView {
    /// Sockets hung now.
    hung_now: std::collections::HashMap<LeakKey, u64>,
    /// Sockets that became hung since the last report.
    new: std::collections::HashMap<LeakKey, u64>,
    /// The receive queue of each socket hung now, as its last check found it, with its line.
    queued: std::collections::HashMap<(std::net::SocketAddr, std::net::SocketAddr), (LeakKey, u64)>,
}

/// Whose hung sockets a line of the leak view counts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct LeakKey {
    phase_index: usize,
    owner: Option<Holder>,
    /// The socket's namespace and cgroup, when tallied per process.
    placement: Option<Placement>,
    /// The container, pod, cgroup or namespace, when tallied by one.
    group: Option<String>,
}

/// One line of the leak view.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Leak {
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Where these sockets live (per-process lines only: a process's sockets in different
    /// namespaces or cgroups make different lines). Rendered with the names it resolves to.
    #[serde(skip)]
    pub placement: Option<Placement>,
    /// Sockets of this process (or group) hung in `state` now.
    pub hung_now: u64,
    /// Sockets that became hung during the interval.
    pub new: u64,
    /// Per-process lines: the bytes received and not read by the process on its sockets hung
    /// now, as their checks found them (see [`LeakView::observe_queue`]); `None` on group lines.
    pub recv_queue: Option<u64>,
}

impl LeakView {
    /// Counts an alert about a socket held by `owner` (`None`: unknown).
    pub fn observe(&mut self, alert: &Alert, owner: Option<&Holder>) {
        self.count(alert, owner.cloned(), Some(alert.placement), None);
    }

    /// Keeps the receive queue the check of a hung socket held by `owner` found (`None`: not
    /// checked), for its per-process line; let go when the socket is resolved or evicted.
    pub fn observe_queue(
        &mut self,
        alert: &Alert,
        owner: Option<&Holder>,
        recv_queue: Option<u32>,
    ) {
        let tuple = (alert.local, alert.remote);
        match (alert.kind, recv_queue) {
            (AlertKind::Hung { .. }, Some(bytes)) => {
                let key = LeakKey {
                    phase_index: alert.phase as usize,
                    owner: owner.cloned(),
                    placement: Some(alert.placement),
                    group: None,
                };
                self.queued.insert(tuple, (key, u64::from(bytes)));
            }
            (AlertKind::Hung { .. }, None) => {}
            (AlertKind::Resolved { .. } | AlertKind::Evicted { .. }, _) => {
                self.queued.remove(&tuple);
            }
        }
    }

    /// Counts an alert about a socket in `group` (a container, pod, cgroup or namespace).
    pub fn observe_group(&mut self, alert: &Alert, group: String) {
        self.count(alert, None, None, Some(group));
    }

    fn count(
        &mut self,
        alert: &Alert,
        owner: Option<Holder>,
        placement: Option<Placement>,
        group: Option<String>,
    ) {
        let key = LeakKey {
            phase_index: alert.phase as usize,
            owner,
            placement,
            group,
        };
        match alert.kind {
            AlertKind::Hung { again: false, .. } => {
                *self.hung_now.entry(key.clone()).or_default() += 1;
                *self.new.entry(key).or_default() += 1;
            }
            AlertKind::Hung { again: true, .. } => {}
            AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => {
                if let Some(n) = self.hung_now.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.hung_now.remove(&key);
                    }
                }
            }
        }
    }

    /// Sockets hung now, per phase.
    pub fn hung_by_phase(&self) -> Vec<(Phase, u64)> {
        Phase::ALL
            .into_iter()
            .map(|phase| {
                let n = self
                    .hung_now
                    .iter()
                    .filter(|(key, _)| key.phase_index == phase as usize)
                    .map(|(_, n)| n)
                    .sum();
                (phase, n)
            })
            .collect()
    }

    /// Sockets hung now, per phase and group (tallied with [`LeakView::observe_group`]).
    pub fn hung_by_phase_and_group(&self) -> Vec<(Phase, String, u64)> {
        let mut hung: Vec<(Phase, String, u64)> = Vec::new();
        for (key, n) in &self.hung_now {
            let (Some(phase), Some(group)) = (
                Phase::ALL
                    .into_iter()
                    .find(|p| *p as usize == key.phase_index),
                &key.group,
            ) else {
                continue;
            };
            match hung.iter_mut().find(|(p, g, _)| *p == phase && g == group) {
                Some((.., total)) => *total += n,
                None => hung.push((phase, group.clone(), *n)),
            }
        }
        hung
    }

    /// The `top` processes per state by sockets hung now, then by new ones; starts a new
    /// interval.
    pub fn report(&mut self, top: usize) -> Vec<Leak> {
        let mut keys: Vec<LeakKey> = self
            .hung_now
            .keys()
            .chain(self.new.keys())
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        let mut queued = std::collections::HashMap::<&LeakKey, u64>::new();
        for (key, bytes) in self.queued.values() {
            *queued.entry(key).or_default() += bytes;
        }
        let mut leaks: Vec<Leak> = keys
            .into_iter()
            .map(|key| Leak {
                state: Phase::ALL
                    .into_iter()
                    .find(|p| *p as usize == key.phase_index)
                    .map_or("?", Phase::name),
                group: key.group.clone(),
                pid: key.owner.as_ref().map(|h| h.pid),
                comm: key.owner.as_ref().map(|h| h.comm.clone()),
                placement: key.placement,
                hung_now: self.hung_now.get(&key).copied().unwrap_or(0),
                new: self.new.get(&key).copied().unwrap_or(0),
                recv_queue: key
                    .group
                    .is_none()
                    .then(|| queued.get(&key).copied().unwrap_or(0)),
            })
            .collect();
        leaks.sort_by(|a, b| {
            (
                Phase::ALL.iter().position(|p| p.name() == a.state),
                b.hung_now,
                b.new,
            )
                .cmp(&(
                    Phase::ALL.iter().position(|p| p.name() == b.state),
                    a.hung_now,
                    a.new,
                ))
        });
        let mut shown_per_state = std::collections::HashMap::<&str, usize>::new();
        leaks.retain(|l| {
            let n = shown_per_state.entry(l.state).or_default();
            *n += 1;
            *n <= top
        });
        self.new.clear();
        leaks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(kind: AlertKind, phase: Phase, port: u16) -> Alert {
        Alert {
            kind,
            phase,
            ts_ns: 0,
            since_ns: 0,
            since_is_lower_bound: false,
            family: Family::Ipv4,
            local: SocketAddr::from(([127, 0, 0, 1], port)),
            remote: SocketAddr::from(([127, 0, 0, 1], 80)),
            owner: None,
            key: SocketKey::Full(u64::from(port)),
            placement: crate::event::Placement::default(),
        }
    }

    /// A process's line holds the bytes its hung sockets hold unread, as their last checks
    /// found them; a socket resolved or evicted no longer counts.
    #[test]
    fn leak_view_adds_up_the_unread_bytes_of_each_process() {
        let leaky = Holder {
            pid: 10,
            comm: "leaky".into(),
        };
        let hung = |again| AlertKind::Hung { age_ns: 1, again };
        let mut v = LeakView::default();
        for (port, bytes) in [(1, Some(100)), (2, Some(5)), (3, None)] {
            let a = alert(hung(false), Phase::CloseWait, port);
            v.observe(&a, Some(&leaky));
            v.observe_queue(&a, Some(&leaky), bytes);
        }
        // Checked again with more unread: the new figure replaces the old.
        v.observe_queue(
            &alert(hung(true), Phase::CloseWait, 2),
            Some(&leaky),
            Some(7),
        );
        assert_eq!(v.report(10)[0].recv_queue, Some(107));
        let resolved = alert(AlertKind::Resolved { stuck_ns: 3 }, Phase::CloseWait, 1);
        v.observe(&resolved, Some(&leaky));
        v.observe_queue(&resolved, Some(&leaky), Some(100));
        let report = v.report(10);
        assert_eq!((report[0].hung_now, report[0].recv_queue), (2, Some(7)));
        let mut groups = LeakView::default();
        groups.observe_group(&alert(hung(false), Phase::CloseWait, 1), "web".into());
        assert_eq!(
            groups.report(10)[0].recv_queue,
            None,
            "group lines say nothing"
        );
    }

    #[test]
    fn leak_view_ranks_processes_per_state() {
        let leaky = Holder {
            pid: 10,
            comm: "leaky".into(),
        };
        let tidy = Holder {
            pid: 20,
            comm: "tidy".into(),
        };
        let hung = AlertKind::Hung {
            age_ns: 1,
            again: false,
        };
        let mut v = LeakView::default();
        for port in 0..5 {
            v.observe(&alert(hung, Phase::CloseWait, port), Some(&leaky));
        }
        v.observe(&alert(hung, Phase::CloseWait, 9), Some(&tidy));
        v.observe(&alert(hung, Phase::LastAck, 8), None);
        // Reported again: not counted twice.
        v.observe(
            &alert(
                AlertKind::Hung {
                    age_ns: 2,
                    again: true,
                },
                Phase::CloseWait,
                0,
            ),
            Some(&leaky),
        );
        v.observe(
            &alert(AlertKind::Resolved { stuck_ns: 3 }, Phase::CloseWait, 9),
            Some(&tidy),
        );
        let report = v.report(10);
        assert_eq!(report.len(), 3, "{report:?}");
        assert_eq!(
            (
                report[0].state,
                report[0].pid,
                report[0].hung_now,
                report[0].new
            ),
            ("CLOSE_WAIT", Some(10), 5, 5)
        );
        assert_eq!(
            (
                report[1].state,
                report[1].pid,
                report[1].hung_now,
                report[1].new
            ),
            ("CLOSE_WAIT", Some(20), 0, 1)
        );
        assert_eq!((report[2].state, report[2].pid), ("LAST_ACK", None));
        // A new interval: nothing new, still hung.
        let report = v.report(1);
        assert_eq!(report.len(), 2);
        assert_eq!((report[0].hung_now, report[0].new), (5, 0));
    }

    #[test]
    fn the_sweep_is_a_tenth_of_the_shortest_threshold_within_bounds() {
        let s = 1_000_000_000;
        let with = |phase, ns| {
            let mut t = Thresholds::DEFAULT;
            t.set(phase, Some(ns));
            t
        };
        // The defaults' shortest is 30 s: every 2 s, the longest interval.
        assert_eq!(Thresholds::DEFAULT.sweep_ns(), SWEEP_MAX_NS);
        assert_eq!(with(Phase::TimeWait, 5 * s).sweep_ns(), s / 2);
        // What the tests against the kernel use (1 s, 2 s): every 200 ms, as always.
        assert_eq!(with(Phase::FinWait2, s).sweep_ns(), SWEEP_MIN_NS);
        assert_eq!(with(Phase::CloseWait, 2 * s).sweep_ns(), SWEEP_MIN_NS);
        assert_eq!(with(Phase::LastAck, 0).sweep_ns(), SWEEP_MIN_NS);
        assert_eq!(Thresholds::NONE.sweep_ns(), SWEEP_MAX_NS);
    }

    #[test]
    fn defaults_leave_time_wait_alone() {
        assert_eq!(Thresholds::DEFAULT.get(Phase::TimeWait), None);
        assert!(Thresholds::DEFAULT.get(Phase::CloseWait).is_some());
        assert!(Thresholds::NONE.is_empty());
        assert_eq!(
            Thresholds::DEFAULT.to_string(),
            "FIN_WAIT1=30s, FIN_WAIT2=90s, CLOSING=30s, CLOSE_WAIT=60s, LAST_ACK=30s"
        );
    }
}
