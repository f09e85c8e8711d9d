//! What a run prints, one pipeline per output mode: [`Events`] (every state change) and
//! [`Teardowns`] (one record per connection that ended, hung teardowns as they happen, the
//! distributions and the metrics). The run loop (`run::run`) drains the ring and hands each
//! decoded record to its pipeline, which formats lines into the buffer it is given.

mod events;
mod hangs;
mod teardowns;

use std::io;

use anyhow::Result;

pub use events::Events;
pub use teardowns::{Exported, Teardowns};

use crate::{
    event::{Cause, TimewaitTimer, Transition},
    hang_check::Reply,
    metrics::EventTotals,
    render::Summary,
};

/// Where the hang checks' answers come.
pub type AnswerInbox = tokio::sync::mpsc::UnboundedReceiver<Reply>;

/// One output mode. Each method formats what it has to print into `out`; an error is a
/// formatting error, kept by the caller, and the pipeline goes on following the sockets.
pub trait Pipeline {
    /// A state change.
    fn on_transition(&mut self, t: &Transition, out: &mut Vec<u8>) -> io::Result<()>;

    /// A timer event of a timewait socket.
    fn on_timewait(&mut self, timer: &TimewaitTimer, out: &mut Vec<u8>) -> io::Result<()>;

    /// A reset or FIN retransmission: nothing to print in the modes that do not explain
    /// teardowns.
    fn on_cause(&mut self, _cause: &Cause, _out: &mut Vec<u8>) -> io::Result<()> {
        Ok(())
    }

    /// What only time completes, at `now_ns` (CLOCK_MONOTONIC). Returns whether more is due
    /// than one call completes: the caller reads the ring first, then calls again.
    fn expire(&mut self, now_ns: u64, out: &mut Vec<u8>) -> (bool, io::Result<()>);

    /// The aggregates shown every `--interval` and at exit.
    fn show_aggregates(&mut self, _now_ns: u64, _out: &mut Vec<u8>) -> io::Result<()> {
        Ok(())
    }

    /// The aggregates at exit: skipped when an `--interval` tick just showed the same.
    fn show_final_aggregates(&mut self, now_ns: u64, out: &mut Vec<u8>) -> io::Result<()> {
        self.show_aggregates(now_ns, out)
    }

    /// Brings the metrics up to date, when they are served.
    fn refresh_metrics(&mut self, _events: EventTotals) {}

    /// Starts the thread that checks hangs, when hangs are reported; returns where its answers
    /// come. Called once the capabilities not needed any more are dropped.
    fn start_hang_checks(&mut self) -> Result<Option<AnswerInbox>> {
        Ok(None)
    }

    /// What the hang checker answered.
    fn on_answers(&mut self, _reply: Reply, _out: &mut Vec<u8>) -> io::Result<()> {
        Ok(())
    }

    /// Asks for a census of the kernel's sockets (events were missed or lost).
    fn census(&mut self) {}

    /// Whether the last census found sockets that the next is to confirm.
    fn census_pending(&self) -> bool {
        false
    }

    /// Whether hang checks are still under way.
    fn checking_hangs(&self) -> bool {
        false
    }

    /// At exit: whatever is still held back, checked or not.
    fn finish(&mut self, out: &mut Vec<u8>) -> io::Result<()>;

    /// Its part of the summary.
    fn fill_summary(&self, summary: &mut Summary);
}

/// Keeps the first error of a series of prints and skips the prints after it.
pub(crate) struct FirstError(io::Result<()>);

impl FirstError {
    pub(crate) fn print(&mut self, f: impl FnOnce() -> io::Result<()>) {
        if self.0.is_ok() {
            self.0 = f();
        }
    }

    pub(crate) fn keep(&mut self, result: io::Result<()>) {
        if self.0.is_ok() {
            self.0 = result;
        }
    }

    pub(crate) fn into_result(self) -> io::Result<()> {
        self.0
    }
}

impl Default for FirstError {
    fn default() -> Self {
        Self(Ok(()))
    }
}
