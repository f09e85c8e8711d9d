//! The default output: one record per connection that ended, with its phases timed; hung
//! teardowns as they happen (see [`Hangs`]); the distributions; the metrics.

use std::{
    io,
    sync::{Arc, Mutex},
};

use anyhow::Result;

use super::{AnswerInbox, FirstError, Pipeline, hangs::Hangs};
use crate::{
    event::{TimewaitTimer, Transition},
    hang_check::Reply,
    metrics::{EventTotals, Metrics},
    render::{AlertPrinter, Format, Summary, TeardownPrinter, WallClock, print_distributions},
    settings::TeardownSettings,
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
    hangs: Hangs,
    distributions: Distributions,
    group_by: Option<&'static str>,
    format: Format,
    clock: WallClock,
    metrics: Option<Exported>,
}

impl Teardowns {
    /// `correlator` follows the sockets; `colour`: the text is for a terminal; `now_ns` starts
    /// the first leak interval.
    pub fn new(
        correlator: Correlator,
        settings: &TeardownSettings,
        format: Format,
        colour: bool,
        metrics: Option<Exported>,
        now_ns: u64,
    ) -> Self {
        Self {
            correlator,
            printer: TeardownPrinter::new(format, WallClock::now(), colour),
            done: Vec::new(),
            printed: 0,
            hangs: Hangs::new(AlertPrinter::new(format, WallClock::now(), colour), now_ns),
            distributions: Distributions::new(
                settings.group_by.map(|(by, _)| by),
                GROUPS_SHOWN * 4,
            ),
            group_by: settings.group_by.map(|(_, name)| name),
            format,
            clock: WallClock::now(),
            metrics,
        }
    }

    /// Prints the records completed since the last call, and counts them in the distributions
    /// and the metrics.
    fn print_done(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        self.printed += self.done.len() as u64;
        let mut result = FirstError::default();
        for teardown in self.done.drain(..) {
            self.distributions.record(&teardown);
            if let Some(m) = &self.metrics {
                m.metrics.teardown(&teardown);
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
        self.hangs.show_leaks(now_ns, out)
    }

    /// Brings the gauges up to date and encodes the exposition for the next scrapes.
    fn refresh_metrics(&mut self, events: EventTotals) {
        let Some(m) = &mut self.metrics else {
            return;
        };
        m.metrics.update(
            &self.correlator.state_counts(),
            &self.hangs.hung_by_phase(),
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
