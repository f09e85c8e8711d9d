//! Hung teardowns, reported while they happen: the alerts the engine makes, checked with the
//! kernel off the ring's thread ([`HangChecker`]), named with the processes that hold their
//! sockets, printed in order, and tallied in the leak view.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
};

use anyhow::Result;

use super::{AnswerInbox, FirstError};
use crate::{
    cgroups::group_of,
    hang_check::{
        Answer, HangChecker, MAX_PENDING, PendingAlerts, Reply, Verdict, Waiting, needs_check,
    },
    hung::{Alert, AlertKind, Holder, LeakView, SocketKey},
    metrics::LabelBy,
    render::{AlertPrinter, OwnedAlert, Summary},
    settings::owner_passes,
    stats::GroupBy,
    teardown::{Correlator, Phase, Teardown},
};

/// Processes shown per state in the leak view.
const LEAKS_SHOWN: usize = 10;

pub(super) struct Hangs {
    printer: AlertPrinter,
    /// The engine's alerts of the current pass, reused.
    alerts: Vec<Alert>,
    /// Who held each socket reported hung, until it is resolved.
    holders: HashMap<(SocketAddr, SocketAddr), Vec<Holder>>,
    /// What each socket reported hung waited on at its last check, until it is resolved.
    waiting: HashMap<(SocketAddr, SocketAddr), Waiting>,
    /// Alerts on their way out, in order, some waiting for the kernel's word.
    pending: PendingAlerts,
    /// Where checks go (`None` until started, and when hangs are not watched).
    checker: Option<HangChecker>,
    /// Hangs the checks withdrew before they were reported (4-tuple, phase, since): the
    /// resolution or eviction the engine made of one meanwhile is not reported either.
    withdrawn: HashSet<(SocketAddr, SocketAddr, Phase, u64)>,
    leaks: LeakView,
    /// Tallies the leak view by where sockets live instead of by process.
    leaks_by: Option<GroupBy>,
    /// `--metrics-label`: the hung sockets tallied by container or pod, for the hung gauge.
    labelled: Option<(LabelBy, LeakView)>,
    /// `--pid`: only these owners' hangs (all when empty).
    pids: Vec<u32>,
    leaks_shown_ns: u64,
    /// Hung, resolved and evicted alerts printed.
    reported: u64,
    /// Hangs whose report waited for a later sweep: too many checks were under way.
    deferred: u64,
    /// Sockets in a teardown state that a census found unfollowed or in another state.
    census_corrected: u64,
}

impl Hangs {
    /// `leaks_by`: tally the leak view by container, pod, cgroup or namespace, not by process.
    pub(super) fn new(printer: AlertPrinter, leaks_by: Option<GroupBy>, now_ns: u64) -> Self {
        Self {
            printer,
            leaks_by,
            labelled: None,
            pids: Vec::new(),
            alerts: Vec::new(),
            holders: HashMap::new(),
            waiting: HashMap::new(),
            pending: PendingAlerts::default(),
            checker: None,
            withdrawn: HashSet::new(),
            leaks: LeakView::default(),
            leaks_shown_ns: now_ns,
            reported: 0,
            deferred: 0,
            census_corrected: 0,
        }
    }

    /// Tallies the hung sockets by container or pod too, for the hung gauge (`--metrics-label`).
    pub(super) fn label_by(&mut self, by: LabelBy) {
        self.labelled = Some((by, LeakView::default()));
    }

    /// Reports only the hangs of sockets these processes own (`--pid`; all when empty).
    pub(super) fn owned_by(&mut self, pids: Vec<u32>) {
        self.pids = pids;
    }

    /// Starts the thread that checks hangs (see [`HangChecker`]) when `correlator` watches
    /// hangs; returns where its answers come.
    pub(super) fn start_checks(&mut self, correlator: &Correlator) -> Result<Option<AnswerInbox>> {
        if !correlator.watches_hangs() {
            return Ok(None);
        }
        let (checker, answers) = HangChecker::start()?;
        self.checker = Some(checker);
        Ok(Some(answers))
    }

    /// Takes the engine's alerts due at `now_ns` and sends those that need it to be checked
    /// (bounded: see [`MAX_PENDING`]), then reports what is ready.
    pub(super) fn poll(
        &mut self,
        correlator: &mut Correlator,
        done: &mut Vec<Teardown>,
        now_ns: u64,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        correlator.poll_hung(now_ns, &mut self.alerts);
        if !self.alerts.is_empty() {
            let mut checks = Vec::new();
            for alert in self.alerts.drain(..) {
                if needs_check(&alert) && !self.pending.has_room() {
                    // Bounded: a first report is made again at a later sweep (the engine
                    // forgets it was due); a repeat waits for its next turn.
                    if let AlertKind::Hung { again: false, .. } = alert.kind {
                        correlator.withdraw_hang(alert.key);
                    }
                    self.deferred += 1;
                    continue;
                }
                checks.extend(self.pending.push(alert));
            }
            match &self.checker {
                Some(checker) => checker.ask(checks),
                // Nothing checks: each is reported as the engine has it.
                None => {
                    for check in checks {
                        self.pending.answered(Answer {
                            id: check.id,
                            verdict: Verdict::Unknown,
                            holders: None,
                        });
                    }
                }
            }
        }
        self.release(false, correlator, done, now_ns, out)
    }

    /// Takes what the hang checker answered: checks, whose alerts it reports once ready, or a
    /// census, whose unfollowed sockets the engine adopts.
    pub(super) fn on_answers(
        &mut self,
        reply: Reply,
        correlator: &mut Correlator,
        done: &mut Vec<Teardown>,
        now_ns: u64,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        match reply {
            Reply::Answers(answers) => {
                for answer in answers {
                    self.pending.answered(answer);
                }
                self.release(false, correlator, done, now_ns, out)
            }
            Reply::Census(found) => {
                self.census_corrected += correlator.reconcile(&found) as u64;
                Ok(())
            }
        }
    }

    /// Asks for a census of the kernel's sockets in the states `correlator` watches.
    pub(super) fn census(&self, correlator: &Correlator) {
        if let Some(checker) = &self.checker {
            checker.census(correlator.census_states());
        }
    }

    /// Whether hang checks are still under way.
    pub(super) fn checking(&self) -> bool {
        self.pending.checking() > 0
    }

    /// Reports the alerts that are ready, in order (with `all`, every one, checked or not),
    /// after the kernel's word on each: see [`settle`].
    pub(super) fn release(
        &mut self,
        all: bool,
        correlator: &mut Correlator,
        done: &mut Vec<Teardown>,
        now_ns: u64,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let mut result = FirstError::default();
        for (alert, verdict, holders) in self.pending.ready(all) {
            let found_waiting = match verdict {
                Verdict::Confirmed { waiting, .. } => waiting,
                _ => None,
            };
            let Some(alert) = settle(
                alert,
                verdict,
                correlator,
                done,
                &mut self.withdrawn,
                now_ns,
            ) else {
                continue;
            };
            let tuple = (alert.local, alert.remote);
            if let Some(holders) = holders {
                self.holders.insert(tuple, holders);
            }
            if let Some(waiting) = found_waiting {
                self.waiting.insert(tuple, waiting);
            }
            let (holders, waiting) = match alert.kind {
                AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => {
                    (self.holders.remove(&tuple), self.waiting.remove(&tuple))
                }
                AlertKind::Hung { .. } => (
                    self.holders.get(&tuple).cloned(),
                    self.waiting.get(&tuple).copied(),
                ),
            };
            let owned = OwnedAlert {
                alert,
                holders: holders.unwrap_or_default(),
                waiting,
            };
            if !self.pids.is_empty()
                && !owned.holders.iter().any(|h| self.pids.contains(&h.pid))
                && !owner_passes(&self.pids, owned.alert.owner.map(|o| o.pid))
            {
                continue;
            }
            match self.leaks_by {
                Some(by) => {
                    let group = group_of(by, owned.alert.placement, self.printer.cgroups());
                    self.leaks
                        .observe_group(&owned.alert, group.unwrap_or_default());
                }
                None => {
                    let holder = owned.holder();
                    self.leaks.observe(&owned.alert, holder.as_ref());
                    self.leaks.observe_queue(
                        &owned.alert,
                        holder.as_ref(),
                        owned.waiting.map(|w| w.recv_queue),
                    );
                }
            }
            if let Some((by, view)) = &mut self.labelled {
                let cgroups = self.printer.cgroups();
                let info = owned
                    .alert
                    .placement
                    .cgroup()
                    .and_then(|id| cgroups.info(id));
                view.observe_group(&owned.alert, by.value(info.as_deref()).to_owned());
            }
            self.reported += 1;
            result.print(|| self.printer.print(out, &owned));
        }
        if self.withdrawn.len() > MAX_PENDING {
            // Withdrawn hangs whose engine never made a resolution: let go of them.
            self.withdrawn.clear();
        }
        result.into_result()
    }

    /// The hung sockets per teardown state now, for the metrics.
    pub(super) fn hung_by_phase(&self) -> Vec<(Phase, u64)> {
        self.leaks.hung_by_phase()
    }

    /// The hung sockets per teardown state and `--metrics-label` value now, when labelled.
    pub(super) fn hung_by_label(&self) -> Option<Vec<(Phase, String, u64)>> {
        self.labelled
            .as_ref()
            .map(|(_, view)| view.hung_by_phase_and_group())
    }

    /// Prints the leak view and starts a new leak interval.
    pub(super) fn show_leaks(&mut self, now_ns: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let leaks = self.leaks.report(LEAKS_SHOWN);
        let result = self.printer.print_leaks(
            out,
            &leaks,
            self.leaks_by.map(|by| by.name()),
            now_ns,
            now_ns.saturating_sub(self.leaks_shown_ns),
        );
        self.leaks_shown_ns = now_ns;
        result
    }

    /// Hung, resolved and evicted alerts printed so far.
    pub(super) fn reported(&self) -> u64 {
        self.reported
    }

    pub(super) fn fill_summary(&self, summary: &mut Summary) {
        summary.hung_alerts = self.reported;
        summary.hung_deferred = self.deferred;
        summary.census_corrected = self.census_corrected;
    }
}

/// What becomes of `alert` given the kernel's word on it (see [`HangChecker`]); `None`: not
/// reported. A hang the kernel does not show (gone, or in another state: the engine missed the
/// transition that ended it, e.g. a program run the kernel skipped) is dropped when it was about
/// to be reported for the first time, and the engine is corrected; one reported before is
/// resolved now, at the latest, so that the hung gauges and the owners kept for it let go of it.
/// An answer about a hang the engine has moved past since it asked is stale: it changes nothing
/// in the engine, and a first report it drops takes the engine's resolution of it along.
pub(super) fn settle(
    alert: Alert,
    verdict: Verdict,
    correlator: &mut Correlator,
    done: &mut Vec<Teardown>,
    withdrawn: &mut HashSet<(SocketAddr, SocketAddr, Phase, u64)>,
    now_ns: u64,
) -> Option<Alert> {
    let AlertKind::Hung { age_ns, again } = alert.kind else {
        // A resolution or an eviction: of a hang reported, unless it was withdrawn first.
        let hang = (alert.local, alert.remote, alert.phase, alert.since_ns);
        return (!withdrawn.remove(&hang)).then_some(alert);
    };
    match verdict {
        Verdict::Confirmed { .. } | Verdict::Unknown => return Some(alert),
        _ if !correlator.hang_is_current(&alert) => {
            if !again {
                withdrawn.insert((alert.local, alert.remote, alert.phase, alert.since_ns));
            }
            return None;
        }
        Verdict::Gone => {
            correlator.socket_gone(alert.key);
        }
        Verdict::HandedOver => {
            correlator.handed_over_unseen(alert.key);
            return Some(alert);
        }
        Verdict::Elsewhere => correlator.withdraw_hang(alert.key),
        Verdict::InTimeWait { since_ns } => {
            if let SocketKey::Timewait(tw) = alert.key {
                correlator.timewait_in_time_wait(tw, since_ns);
            }
        }
        Verdict::TimewaitGone => {
            if let SocketKey::Timewait(tw) = alert.key {
                correlator.timewait_gone(tw, now_ns, done);
            }
        }
    }
    again.then_some(Alert {
        kind: AlertKind::Resolved { stuck_ns: age_ns },
        ..alert
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// An engine following a server socket whose peer closed at 1 s (CLOSE_WAIT, hung after
    /// the default 60 s), and the alerts of a sweep at each of `sweeps` (seconds).
    fn close_wait_leak(sweeps: &[u64]) -> (Correlator, Vec<Vec<Alert>>) {
        use crate::{
            event::{Family, Task, TcpState::*, Transition},
            hung::Thresholds,
        };
        let mut correlator = Correlator::watching(1024, Thresholds::DEFAULT);
        let mut done = Vec::new();
        for (at, old, new) in [
            (0, Listen, SynRecv),
            (0, SynRecv, Established),
            (1_000, Established, CloseWait),
        ] {
            let t = Transition {
                ts_ns: at * MS,
                skaddr: 0xffff_0000,
                family: Family::Ipv4,
                local: "10.0.0.1:80".parse().unwrap(),
                remote: "10.0.0.2:5000".parse().unwrap(),
                old,
                new,
                task: Task::new(0, 0, ""),
                placement: crate::event::Placement::default(),
            };
            correlator.on_transition(&t, &mut done);
        }
        let alerts = sweeps
            .iter()
            .map(|&s| {
                let mut out = Vec::new();
                correlator.poll_hung(s * 1_000 * MS, &mut out);
                out
            })
            .collect();
        (correlator, alerts)
    }

    fn settle_one(correlator: &mut Correlator, alert: &Alert, verdict: Verdict) -> Option<Alert> {
        let mut withdrawn = HashSet::new();
        settle(
            alert.clone(),
            verdict,
            correlator,
            &mut Vec::new(),
            &mut withdrawn,
            0,
        )
    }

    #[test]
    fn a_reported_hang_the_kernel_no_longer_shows_is_resolved() {
        let (mut correlator, alerts) = close_wait_leak(&[62, 123]);
        let again = &alerts[1][0];
        assert!(
            matches!(again.kind, AlertKind::Hung { again: true, .. }),
            "{again:?}"
        );
        assert!(correlator.hang_is_current(again));
        let resolved = settle_one(&mut correlator, again, Verdict::Gone).expect("resolved");
        let AlertKind::Hung { age_ns, .. } = again.kind else {
            unreachable!()
        };
        assert_eq!(resolved.kind, AlertKind::Resolved { stuck_ns: age_ns });
        assert_eq!((resolved.local, resolved.key), (again.local, again.key));
        assert!(correlator.is_empty(), "the socket is gone from the engine");
        // Fed to the leak view, it takes back the hang reported before.
        let mut leaks = crate::hung::LeakView::default();
        leaks.observe(&alerts[0][0], None);
        let close_wait = |leaks: &crate::hung::LeakView| {
            leaks
                .hung_by_phase()
                .into_iter()
                .find(|(phase, _)| *phase == Phase::CloseWait)
                .map_or(0, |(_, n)| n)
        };
        assert_eq!(close_wait(&leaks), 1);
        leaks.observe(&resolved, None);
        assert_eq!(close_wait(&leaks), 0);
    }

    #[test]
    fn a_hang_never_reported_the_kernel_shows_elsewhere_is_dropped() {
        let (mut correlator, alerts) = close_wait_leak(&[62]);
        let first = &alerts[0][0];
        assert!(settle_one(&mut correlator, first, Verdict::Elsewhere).is_none());
        assert_eq!(correlator.len(), 1, "still followed");
        assert!(!correlator.hang_is_current(first), "withdrawn");
        // Confirmed, it is reported.
        let (mut correlator, alerts) = close_wait_leak(&[62]);
        let confirmed = Verdict::Confirmed {
            inode: 5,
            waiting: None,
        };
        assert_eq!(
            settle_one(&mut correlator, &alerts[0][0], confirmed).as_ref(),
            Some(&alerts[0][0])
        );
    }

    #[test]
    fn a_stale_answer_changes_nothing_and_takes_the_resolution_along() {
        use crate::event::{Family, Task, TcpState::*, Transition};
        let (mut correlator, alerts) = close_wait_leak(&[62]);
        let first = alerts[0][0].clone();
        // The application closes before the check is answered: the engine resolves the hang.
        let close = Transition {
            ts_ns: 63_000 * MS,
            skaddr: 0xffff_0000,
            family: Family::Ipv4,
            local: first.local,
            remote: first.remote,
            old: CloseWait,
            new: LastAck,
            task: Task::new(1, 1, "app"),
            placement: crate::event::Placement::default(),
        };
        correlator.on_transition(&close, &mut Vec::new());
        let mut later = Vec::new();
        correlator.poll_hung(64_000 * MS, &mut later);
        let resolution = later
            .iter()
            .find(|a| matches!(a.kind, AlertKind::Resolved { .. }))
            .expect("the engine's resolution")
            .clone();
        let mut withdrawn = HashSet::new();
        let mut done = Vec::new();
        // The answer says the socket is elsewhere (it is in LAST_ACK now): stale.
        let hung = settle(
            first,
            Verdict::Elsewhere,
            &mut correlator,
            &mut done,
            &mut withdrawn,
            0,
        );
        assert!(hung.is_none());
        assert_eq!(correlator.len(), 1, "the engine is unchanged");
        // Never reported, so its resolution is not reported either.
        let resolved = settle(
            resolution,
            Verdict::Unknown,
            &mut correlator,
            &mut done,
            &mut withdrawn,
            0,
        );
        assert!(resolved.is_none());
        assert!(withdrawn.is_empty());
    }
}
