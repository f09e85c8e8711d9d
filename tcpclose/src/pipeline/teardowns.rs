//! The default output: one record per connection that ended, with its phases timed; hung
//! teardowns as they happen (see [`Hangs`]); the distributions; the metrics.

use std::{
    io,
    sync::{Arc, Mutex},
};

use anyhow::Result;

use super::{AnswerInbox, FirstError, Pipeline, hangs::Hangs};
use crate::{
    cgroups::{Cgroups, group_of},
    event::{Cause, TimewaitTimer, Transition},
    hang_check::Reply,
    metrics::{EventTotals, HungNow, Metrics},
    render::{AlertPrinter, Format, Summary, TeardownPrinter, WallClock, print_distributions},
    reset_reasons::ResetReasons,
    settings::TeardownSettings,
    settings::owner_passes,
    stats::Distributions,
    teardown::{Correlator, Teardown},
};

/// Groups shown with --group-by; four times as many are kept apart before the rest goes to
/// "other" (bounded memory: a distribution is ~40 KiB).
const GROUPS_SHOWN: usize = 10;

/// The metrics and the exposition the server hands out.
pub struct Exported {
    pub metrics: Metrics,
    pub exposition: Arc<Mutex<String>>,
}

pub struct Teardowns {
    correlator: Correlator,
    printer: TeardownPrinter,
    /// Records completed by the current event, reused.
    done: Vec<Teardown>,
    /// Records printed.
    printed: u64,
    /// What the aggregates had counted when last shown (see [`Teardowns::counted`]).
    shown: Option<(u64, u64)>,
    hangs: Hangs,
    distributions: Distributions,
    group_by: Option<&'static str>,
    format: Format,
    clock: WallClock,
    metrics: Option<Exported>,
    /// Names the groups of `--group-by container|pod|cgroup`.
    cgroups: Cgroups,
    /// `--pid`: only these owners' sockets (all when empty).
    pids: Vec<u32>,
}

impl Teardowns {
    /// Names the kernel's reasons for the resets it sends with `reasons`.
    pub fn naming_reset_reasons(mut self, reasons: ResetReasons) -> Self {
        self.printer.set_reset_reasons(reasons);
        self
    }

    /// `correlator` follows the sockets; `colour`: the text is for a terminal; `cgroups` names
    /// the sockets' cgroups; `now_ns` starts the first leak interval.
    pub fn new(
        correlator: Correlator,
        settings: &TeardownSettings,
        format: Format,
        colour: bool,
        metrics: Option<Exported>,
        cgroups: Cgroups,
        now_ns: u64,
    ) -> Self {
        let printer =
            TeardownPrinter::new(format, WallClock::now(), colour).with_cgroups(cgroups.clone());
        let alerts =
            AlertPrinter::new(format, WallClock::now(), colour).among(printer.alert_columns());
        let labelled_by = metrics.as_ref().and_then(|m| m.metrics.labelled_by());
        let mut teardowns = Self {
            correlator,
            printer,
            done: Vec::new(),
            printed: 0,
            shown: None,
            hangs: Hangs::new(
                alerts.with_cgroups(cgroups.clone()),
                settings
                    .group_by
                    .map(|(by, _)| by)
                    .filter(|by| by.by_placement()),
                now_ns,
            ),
            cgroups,
            pids: Vec::new(),
            distributions: Distributions::new(
                settings.group_by.map(|(by, _)| by),
                GROUPS_SHOWN * 4,
            ),
            group_by: settings.group_by.map(|(_, name)| name),
            format,
            clock: WallClock::now(),
            metrics,
        };
        if let Some(by) = labelled_by {
            teardowns.hangs.label_by(by);
        }
        teardowns
    }

    /// Reports only the sockets these processes own (`--pid`; all when empty).
    pub fn owned_by(mut self, pids: Vec<u32>) -> Self {
        self.hangs.owned_by(pids.clone());
        self.pids = pids;
        self
    }

    /// What the aggregates count: the teardowns in the distributions, the alerts in the leak
    /// view. Unchanged, they would print as they did last time.
    fn counted(&self) -> (u64, u64) {
        (self.printed, self.hangs.reported())
    }

    /// Prints the records completed since the last call, and counts them in the distributions
    /// and the metrics.
    fn print_done(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.printed += self.done.len() as u64;
        let mut result = FirstError::default();
        for teardown in self.done.drain(..) {
            if !owner_passes(&self.pids, teardown.owner.map(|o| o.pid)) {
                continue;
            }
            match self.distributions.group_by().filter(|by| by.by_placement()) {
                Some(by) => {
                    let group = group_of(by, teardown.placement, &self.cgroups);
                    self.distributions
                        .record_in(group.unwrap_or_default(), &teardown);
                }
                None => self.distributions.record(&teardown),
            }
            if let Some(m) = &mut self.metrics {
                let info = m
                    .metrics
                    .labelled_by()
                    .and_then(|_| teardown.placement.cgroup())
                    .and_then(|id| self.cgroups.info(id));
                let value = m
                    .metrics
                    .labelled_by()
                    .map_or("", |by| by.value(info.as_deref()));
                m.metrics.teardown(&teardown, value);
            }
            result.print(|| self.printer.print(out, &teardown));
        }
        result.into_result()
    }
}

impl Pipeline for Teardowns {
    fn on_transition(&mut self, t: &Transition, out: &mut Vec<u8>) -> io::Result<()> {
        if let Some(m) = &mut self.metrics {
            m.metrics.transition(t.old, t.new);
        }
        self.correlator.on_transition(t, &mut self.done);
        self.print_done(out)
    }

    fn on_timewait(&mut self, timer: &TimewaitTimer, out: &mut Vec<u8>) -> io::Result<()> {
        self.correlator.on_timewait(timer, &mut self.done);
        self.print_done(out)
    }

    fn on_cause(&mut self, cause: &Cause, out: &mut Vec<u8>) -> io::Result<()> {
        self.correlator.on_cause(cause, &mut self.done);
        self.print_done(out)
    }

    /// Completes what only time completes (see [`Correlator::expire`]) and reports sockets that
    /// have hung, or stopped hanging, since the last call.
    fn expire(&mut self, now_ns: u64, out: &mut Vec<u8>) -> (bool, io::Result<()>) {
        let more = self.correlator.expire(now_ns, &mut self.done);
        let mut result = FirstError::default();
        result.keep(self.print_done(out));
        result.keep(
            self.hangs
                .poll(&mut self.correlator, &mut self.done, now_ns, out),
        );
        // Checks may have ended lives (timewait sockets gone).
        result.keep(self.print_done(out));
        (more, result.into_result())
    }

    /// Prints the distributions and the leak view, and starts a new leak interval.
    fn show_aggregates(&mut self, now_ns: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let groups = self.distributions.report(GROUPS_SHOWN);
        print_distributions(
            out,
            self.format,
            &self.clock,
            now_ns,
            self.group_by,
            &groups,
        )?;
        self.shown = Some(self.counted());
        self.hangs.show_leaks(now_ns, out)
    }

    /// An `--interval` tick that fell just before the exit showed the same: not again.
    fn show_final_aggregates(&mut self, now_ns: u64, out: &mut Vec<u8>) -> io::Result<()> {
        if self.shown == Some(self.counted()) {
            return Ok(());
        }
        self.show_aggregates(now_ns, out)
    }

    /// Brings the gauges up to date and encodes the exposition for the next scrapes.
    fn refresh_metrics(&mut self, events: EventTotals) {
        let Some(m) = &mut self.metrics else {
            return;
        };
        let by_phase;
        let by_label;
        let hung = match self.hangs.hung_by_label() {
            Some(hung) => {
                by_label = hung;
                HungNow::ByLabel(&by_label)
            }
            None => {
                by_phase = self.hangs.hung_by_phase();
                HungNow::ByState(&by_phase)
            }
        };
        m.metrics.update(
            &self.correlator.state_counts(),
            hung,
            self.correlator.len(),
            events,
        );
        let text = m.metrics.encode();
        if let Ok(mut exposition) = m.exposition.lock() {
            *exposition = text;
        }
    }

    fn start_hang_checks(&mut self) -> Result<Option<AnswerInbox>> {
        self.hangs.start_checks(&self.correlator)
    }

    fn on_answers(&mut self, reply: Reply, out: &mut Vec<u8>) -> io::Result<()> {
        let now_ns = crate::clock::now_ns();
        let mut result = FirstError::default();
        result.keep(self.hangs.on_answers(
            reply,
            &mut self.correlator,
            &mut self.done,
            now_ns,
            out,
        ));
        result.keep(self.print_done(out));
        result.into_result()
    }

    fn census(&mut self) {
        self.hangs.census(&self.correlator);
    }

    fn census_pending(&self) -> bool {
        self.correlator.census_pending()
    }

    fn checking_hangs(&self) -> bool {
        self.hangs.checking()
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let now_ns = crate::clock::now_ns();
        self.correlator.release_held(&mut self.done);
        let mut result = FirstError::default();
        result.keep(
            self.hangs
                .release(true, &mut self.correlator, &mut self.done, now_ns, out),
        );
        result.keep(self.print_done(out));
        result.into_result()
    }

    fn fill_summary(&self, summary: &mut Summary) {
        summary.teardowns = self.printed;
        self.hangs.fill_summary(summary);
        let losses = self.correlator.losses();
        summary.evicted = losses.evicted;
        summary.unfinished = losses.unfinished;
        summary.timewait_unseen = losses.timewait_unseen;
        summary.in_progress = self.correlator.in_progress() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        hung::Thresholds,
        teardown::{CloseKind, Phase},
    };

    /// The distributions at exit are not printed a second time when an `--interval` tick showed
    /// them just before and nothing was counted since; they are when something was.
    #[test]
    fn a_tick_right_before_exit_does_not_print_the_aggregates_twice() {
        let settings = TeardownSettings {
            thresholds: Thresholds::NONE,
            interval: Some(std::time::Duration::from_secs(1)),
            group_by: None,
            metrics: None,
            metrics_label: None,
        };
        let mut teardowns = Teardowns::new(
            Correlator::new(16),
            &settings,
            Format::Text,
            false,
            None,
            Cgroups::none(),
            0,
        );
        teardowns.done.push(Teardown::sample(
            CloseKind::Passive,
            &[(Phase::CloseWait, 1_000_000)],
        ));
        let mut out = Vec::new();
        teardowns.print_done(&mut out).unwrap();
        let shown = |f: &mut dyn FnMut(&mut Vec<u8>) -> io::Result<()>| {
            let mut out = Vec::new();
            f(&mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let tick = shown(&mut |out| teardowns.show_aggregates(1, out));
        assert!(tick.contains("CLOSE_WAIT"), "{tick}");
        let exit = shown(&mut |out| teardowns.show_final_aggregates(2, out));
        assert_eq!(exit, "", "nothing counted since the tick");

        teardowns.done.push(Teardown::sample(
            CloseKind::Passive,
            &[(Phase::CloseWait, 1_000_000)],
        ));
        teardowns.print_done(&mut out).unwrap();
        let exit = shown(&mut |out| teardowns.show_final_aggregates(3, out));
        assert!(
            exit.contains("2 teardowns"),
            "one more since the tick: {exit}"
        );
    }
}
