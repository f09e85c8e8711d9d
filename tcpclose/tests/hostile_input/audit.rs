//! The audit of an engine fed a hostile stream: after each call, what the engine says and emits
//! is checked against what the inputs allow (the cap, times that were fed, durations within the
//! time fed, hangs resolved only once reported), and counted.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use proptest::prelude::*;
use tcpclose::{
    event::Family,
    hung::{Alert, AlertKind, Thresholds},
    teardown::{CloseKind, Correlator, Losses, Teardown, TimewaitEnd},
};

/// What the engine emitted: whether the streams reach what the properties are about.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Coverage {
    pub(crate) teardowns: u64,
    pub(crate) complete: u64,
    /// Ended on a timewait socket: by its timer, or killed.
    pub(crate) expired: u64,
    pub(crate) killed: u64,
    pub(crate) hung: u64,
    pub(crate) resolved: u64,
}

impl Coverage {
    pub(crate) fn add(&mut self, other: Coverage) {
        self.teardowns += other.teardowns;
        self.complete += other.complete;
        self.expired += other.expired;
        self.killed += other.killed;
        self.hung += other.hung;
        self.resolved += other.resolved;
    }
}

/// The time spent in all the phases of `t` (saturated: a bug may make them absurd).
fn phases_total(t: &Teardown) -> u64 {
    t.phases
        .iter()
        .fold(0, |total: u64, (_, ns)| total.saturating_add(ns))
}

/// What an [`Audit`] checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Everything.
    Strict,
    /// Only the cap, and that what is emitted can be read: timestamps at the clock's ends,
    /// where durations mean nothing. The loader's clock is whatever the stream says.
    Extreme,
    /// Nothing: only counts what is emitted.
    Survey,
}

/// Follows what is fed to the engine, and checks after each call what the engine says and
/// emits against what the inputs allow.
pub(crate) struct Audit {
    cap: usize,
    thresholds: Thresholds,
    wild_tuples: bool,
    /// Every time fed: event timestamps, the loader's clock readings. A teardown ends, and an
    /// alert is dated, at one of them.
    times: HashSet<u64>,
    /// The extremes of every time value fed (with the timers' expiries and sock_diag's ages):
    /// no single duration can exceed their span.
    lowest: u64,
    pub(crate) highest: u64,
    /// How far the times fed moved forward in all, in feed order: with the clock going back and
    /// forth, durations summed over a connection's passes are bounded by this, not by the span.
    forward: u64,
    last: Option<u64>,
    /// The latest event or clock reading: where the loader's clock is, at least.
    pub(crate) latest: u64,
    losses: Losses,
    hung: u64,
    resolved: u64,
    /// Per 4-tuple, hangs reported and not resolved yet (with `!wild_tuples`).
    open_hangs: HashMap<(SocketAddr, SocketAddr), u64>,
    pub(crate) coverage: Coverage,
    pub(crate) mode: Mode,
}

impl Audit {
    pub(crate) fn new(cap: usize, thresholds: Thresholds, wild_tuples: bool) -> Self {
        Self {
            // The engine follows at least 8 sockets, whatever it is asked.
            cap: cap.max(8),
            thresholds,
            wild_tuples,
            times: HashSet::new(),
            lowest: u64::MAX,
            highest: 0,
            forward: 0,
            last: None,
            latest: 0,
            losses: Losses::default(),
            hung: 0,
            resolved: 0,
            open_hangs: HashMap::new(),
            coverage: Coverage::default(),
            mode: Mode::Strict,
        }
    }

    /// A time value fed to the engine, in order.
    pub(crate) fn saw(&mut self, ns: u64) {
        self.lowest = self.lowest.min(ns);
        self.highest = self.highest.max(ns);
        if let Some(last) = self.last {
            self.forward = self.forward.saturating_add(ns.saturating_sub(last));
        }
        self.last = Some(ns);
    }

    /// An event's timestamp or a clock reading of the loader: something may end or be dated
    /// there.
    pub(crate) fn saw_time(&mut self, ns: u64) {
        self.times.insert(ns);
        self.latest = self.latest.max(ns);
        self.saw(ns);
    }

    /// The longest any duration may be: one span of everything fed, plus all the forward travel
    /// of a clock that went back and forth (a phase passed through several times).
    fn duration_bound(&self) -> u64 {
        let span = self.highest.saturating_sub(self.lowest);
        span.saturating_add(self.forward)
    }

    pub(crate) fn after_call(
        &mut self,
        c: &Correlator,
        out: &mut Vec<Teardown>,
        alerts: &mut Vec<Alert>,
    ) -> Result<(), TestCaseError> {
        for t in out.iter() {
            self.coverage.teardowns += 1;
            self.coverage.complete += u64::from(t.complete);
            self.coverage.expired += u64::from(t.timewait_end == Some(TimewaitEnd::Expired));
            self.coverage.killed += u64::from(t.timewait_end == Some(TimewaitEnd::Killed));
        }
        for a in alerts.iter() {
            match a.kind {
                AlertKind::Hung { again: false, .. } => self.coverage.hung += 1,
                AlertKind::Hung { again: true, .. } => {}
                AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => {
                    self.coverage.resolved += 1
                }
            }
        }
        if self.mode == Mode::Survey {
            out.clear();
            alerts.clear();
            return Ok(());
        }
        prop_assert!(
            c.len() <= self.cap,
            "{} sockets followed, more than the cap of {}",
            c.len(),
            self.cap
        );
        if self.mode == Mode::Extreme {
            // Reading what is emitted must not panic either (saturated sums, Debug).
            for t in out.drain(..) {
                let _ = format!("{t:?} {}", phases_total(&t));
            }
            for a in alerts.drain(..) {
                let _ = format!("{a:?}");
            }
            return Ok(());
        }
        prop_assert!(c.in_progress() <= c.len());
        let counted: u64 = c.state_counts().iter().map(|(_, n)| n).sum();
        prop_assert!(counted <= c.len() as u64, "{counted} counted by state");
        // Losses only ever grow.
        let losses = c.losses();
        prop_assert!(
            losses.evicted >= self.losses.evicted
                && losses.unfinished >= self.losses.unfinished
                && losses.timewait_unseen >= self.losses.timewait_unseen,
            "{:?} then {losses:?}",
            self.losses
        );
        self.losses = losses;
        for t in out.drain(..) {
            self.check_teardown(&t)?;
        }
        for a in alerts.drain(..) {
            self.check_alert(&a)?;
        }
        Ok(())
    }

    fn check_teardown(&self, t: &Teardown) -> Result<(), TestCaseError> {
        prop_assert!(
            self.times.contains(&t.end_ns),
            "ends at {}, a time never fed: {t:?}",
            t.end_ns
        );
        let bound = self.duration_bound();
        let phases = phases_total(t);
        prop_assert!(
            phases <= bound,
            "phases sum to {phases} ns, beyond all the time fed ({bound} ns): {t:?}"
        );
        let span = self.highest - self.lowest;
        for ns in [t.teardown_ns, t.lifetime_ns].into_iter().flatten() {
            prop_assert!(ns <= span, "{ns} ns, beyond the span fed ({span}): {t:?}");
        }
        if let Some(lifetime) = t.lifetime_ns {
            // A connection seen whole ("complete") was timed from events it went through in
            // order: its teardown and each of its phases fit in its life. (An incomplete one
            // may add to its phases what a lost event leaves to guesswork.)
            if t.complete {
                if let Some(teardown) = t.teardown_ns {
                    prop_assert!(
                        teardown <= lifetime,
                        "a teardown longer than the connection's life: {t:?}"
                    );
                }
                for (phase, ns) in t.phases.iter() {
                    prop_assert!(
                        ns <= lifetime,
                        "{} longer than the connection's life: {t:?}",
                        phase.name()
                    );
                }
            }
            // Only a connection seen born has a lifetime, and it was born on one side.
            prop_assert!(t.side.is_some(), "{t:?}");
        } else {
            // A connection seen whole was seen born: only an end before its birth would leave
            // it without a lifetime.
            prop_assert!(!t.complete, "complete, but no lifetime: {t:?}");
        }
        if t.close == CloseKind::FinTimeout {
            prop_assert_eq!(t.timewait_end, Some(TimewaitEnd::Expired), "{:?}", t);
        }
        if t.resolution_ns.is_some() {
            prop_assert!(t.timewait_end.is_some(), "jiffies without a timer: {t:?}");
        }
        if !self.wild_tuples {
            // A socket keeps its family: its addresses are of it.
            let v4 = matches!(t.family, Family::Ipv4);
            prop_assert_eq!(t.local.is_ipv4(), v4, "{:?}", t);
            prop_assert_eq!(t.remote.is_ipv4(), v4, "{:?}", t);
        }
        Ok(())
    }

    fn check_alert(&mut self, a: &Alert) -> Result<(), TestCaseError> {
        prop_assert!(self.times.contains(&a.ts_ns), "dated {}: {a:?}", a.ts_ns);
        let ends = (a.local, a.remote);
        match a.kind {
            AlertKind::Hung { age_ns, again } => {
                let threshold = self.thresholds.get(a.phase);
                prop_assert!(threshold.is_some(), "hung in a phase not watched: {a:?}");
                if !again {
                    prop_assert!(age_ns >= threshold.unwrap_or(0), "too early: {a:?}");
                    prop_assert_eq!(Some(age_ns), a.ts_ns.checked_sub(a.since_ns), "{:?}", a);
                    self.hung += 1;
                    *self.open_hangs.entry(ends).or_default() += 1;
                }
            }
            AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => {
                if let AlertKind::Evicted { age_ns } = a.kind {
                    prop_assert_eq!(Some(age_ns), a.ts_ns.checked_sub(a.since_ns), "{:?}", a);
                }
                // A hang ends (resolved, or no longer followed) at most once, and only after it
                // was reported: at no point have more hangs ended than were reported.
                self.resolved += 1;
                prop_assert!(
                    self.resolved <= self.hung,
                    "{} resolved, {} reported: {a:?}",
                    self.resolved,
                    self.hung
                );
                // A socket keeps its 4-tuple from its first teardown phase to its end, while its
                // key may change (start-up snapshot, full socket, timewait socket): the hang
                // resolved is one reported on the same 4-tuple.
                if !self.wild_tuples {
                    let open = self.open_hangs.entry(ends).or_default();
                    prop_assert!(*open > 0, "resolved, never reported hung: {a:?}");
                    *open -= 1;
                }
            }
        }
        Ok(())
    }
}
