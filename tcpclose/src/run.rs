//! One tracing run: attach, drain the ring buffer until told to stop, detach, summarise.

use std::{
    io::{self, IsTerminal as _},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tcpclose::{
    accepted::AcceptedEnds,
    event::{Record, Transition},
    hung::{Alert, AlertKind, Holder, LeakView, SocketKey},
    render::{
        AlertPrinter, EventPrinter, Format, OwnedAlert, Summary, TeardownPrinter, WallClock,
        clock_ns, print_distributions,
    },
    states::SocketStates,
    stats::Distributions,
    teardown::{Correlator, ExistingSocket, Phase, Teardown},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
    hang_check::{Answer, HangChecker, MAX_PENDING, PendingAlerts, Reply, Verdict, needs_check},
    metrics::{self, EventTotals, Metrics},
    output::Output,
    sockets, system,
    tracer::{KernelFilter, Tracer},
};

/// How often the metrics exposition is refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(1);
/// Processes shown per state in the leak view.
const LEAKS_SHOWN: usize = 10;
/// Groups shown with --group-by; four times as many are kept apart before the rest goes to
/// "other" (bounded memory: a distribution is ~40 KiB).
const GROUPS_SHOWN: usize = 10;

/// How often the ring buffer is drained when the kernel program has not asked for it (it only
/// wakes the consumer once a backlog builds up). Bounds the delay from kernel to output.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How often, at most, the kernel's sockets in teardown states are listed to find those whose
/// events were missed or lost (only when some were).
const CENSUS_INTERVAL: Duration = Duration::from_secs(5);
/// How long the hang checks under way at exit may take before their alerts are reported
/// unchecked.
const FINAL_CHECKS: Duration = Duration::from_secs(5);
/// Records handled before the loop checks its other work (signals, deadline) again.
const BATCH: usize = 4096;

pub async fn run(cli: Cli) -> Result<()> {
    let format = if cli.json { Format::Json } else { Format::Text };
    let mut tracer = Tracer::attach(
        &cli.kernel_filter(),
        cli.ring_bytes,
        !cli.events,
        cli.btf.as_deref(),
    )?;
    let mut interval = tokio::time::interval(cli.interval.unwrap_or(Duration::MAX / 4));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate.
    interval.tick().await;
    let started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let deadline = tokio::time::sleep(cli.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // The run loop refreshes the exposition every second; scrapes read the last one.
    let metrics = match cli.metrics {
        Some(addr) => {
            let exposition = Arc::new(Mutex::new(String::new()));
            let server = metrics::serve(addr, exposition.clone()).await?;
            tokio::spawn(server);
            let m = Metrics::new();
            metrics::touch_all(&m);
            Some(Exported {
                metrics: m,
                exposition,
            })
        }
        None => None,
    };
    let mut refresh = tokio::time::interval(METRICS_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let filter = cli.kernel_filter();
    let view = if cli.events {
        View::Events {
            states: SocketStates::new(cli.max_sockets),
            printer: Box::new(EventPrinter::new(format, WallClock::now())),
            accepted: AcceptedEnds::default(),
        }
    } else {
        let colour = format == Format::Text && io::stdout().is_terminal();
        let mut correlator =
            Correlator::watching(cli.max_sockets, cli.hung_thresholds()).in_kernel_order();
        if filter.skip_established {
            correlator = correlator.without_handshake_ends();
        }
        if !cli.hung_thresholds().is_empty() {
            adopt_existing(&mut correlator, &filter);
        }
        View::Teardowns(Box::new(Teardowns {
            correlator,
            printer: TeardownPrinter::new(format, WallClock::now(), colour),
            alert_printer: AlertPrinter::new(format, WallClock::now(), colour),
            done: Vec::new(),
            alerts: Vec::new(),
            holders: HashMap::new(),
            pending: PendingAlerts::default(),
            checker: None,
            withdrawn: HashSet::new(),
            leaks: LeakView::default(),
            leaks_shown_ns: now_ns(),
            distributions: Distributions::new(cli.group_by.map(|g| g.group_by()), GROUPS_SHOWN * 4),
            group_by: cli.group_by.map(|g| g.name()),
            format,
            clock: WallClock::now(),
            metrics,
        }))
    };
    // Attached, listening, snapshot taken: what is left needs few privileges.
    system::drop_capabilities()?;
    let out = Output::stdout().context("starting the output thread")?;
    let mut session = Session::new(view, tracer.timewait_jiffy_ns().unwrap_or(0), out);
    // After the capabilities are dropped: the thread inherits what is left.
    let mut answers = session.start_hang_checks()?;
    let mut census = tokio::time::interval(CENSUS_INTERVAL);
    census.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Events missed or lost at the last census.
    let mut census_gaps = 0;
    if cli.events {
        eprintln!("Tracing TCP state changes... Hit Ctrl-C to end.");
    } else {
        eprintln!("Tracing TCP teardowns... Hit Ctrl-C to end.");
    }

    // The last drain stopped at its cap, or more than one pass completes was due.
    let mut behind = false;
    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline, if cli.duration.is_some() => break,
            // Work left from the last pass: go on after letting other tasks run.
            () = tokio::task::yield_now(), if behind => {}
            ready = tracer.backlog() => ready.context("waiting on the ring buffer")?,
            _ = interval.tick(), if cli.interval.is_some() => session.show_aggregates(),
            _ = refresh.tick(), if cli.metrics.is_some() => {
                let counters = tracer.counters()?;
                session.refresh_metrics(EventTotals {
                    matched: counters.matched + counters.timewait_matched,
                    received: session.transitions + session.timewait_events + session.undecodable,
                    lost: counters.lost + counters.timewait_lost,
                    missed: tracer.missed()?,
                });
            }
            Some(batch) = next_answers(&mut answers) => session.on_answers(batch),
            _ = census.tick(), if answers.is_some() => {
                // Events missed or lost since the last census: some sockets may be unfollowed or
                // followed in a state they have left. What a census finds, the next confirms.
                let counters = tracer.counters()?;
                let gaps = tracer.missed()? + counters.lost + counters.timewait_lost;
                if gaps > census_gaps || session.census_pending() {
                    census_gaps = gaps;
                    session.census();
                }
            }
            _ = tick.tick() => {}
        }
        let pass_ns = now_ns();
        let drained = tracer.drain(BATCH, |record| session.handle(record));
        session.lag.pass(pass_ns, drained, now_ns);
        // Caught up with the kernel: what only time completes is due now.
        behind = drained == BATCH || session.expire();
        if !session.flush()? {
            break;
        }
    }

    // Detach first, then read what the program submitted before it was detached.
    // The programs' own counts go with them: read before detaching.
    let missed = tracer.missed()?;
    tracer.detach();
    while tracer.drain(BATCH, |record| session.handle(record)) > 0 {}
    while session.expire() {}
    session.release_accepted(u64::MAX);
    // The hang checks under way are answered before the summary, for a while.
    let checks_due = tokio::time::sleep(FINAL_CHECKS);
    tokio::pin!(checks_due);
    while session.checking_hangs() {
        tokio::select! {
            Some(batch) = next_answers(&mut answers) => session.on_answers(batch),
            _ = &mut checks_due => break,
        }
    }
    session.release_alerts(true);
    session.show_aggregates();
    session.flush()?;
    let counters = tracer.counters()?;
    let mut summary = Summary {
        transitions: session.transitions,
        lost: counters.lost,
        matched: counters.matched,
        missed,
        undecodable: session.undecodable,
        timewait_matched: counters.timewait_matched,
        timewait_events: session.timewait_events,
        timewait_lost: counters.timewait_lost,
        teardowns: session.teardowns,
        hung_alerts: session.hung_alerts,
        hung_deferred: session.hung_deferred,
        census_corrected: session.census_corrected,
        duration_ns: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        ..Summary::default()
    };
    session.lag.fill(&mut summary);
    match &session.view {
        View::Events { states, .. } => summary.untracked = states.untracked(),
        View::Teardowns(t) => {
            let correlator = &t.correlator;
            let losses = correlator.losses();
            summary.evicted = losses.evicted;
            summary.unfinished = losses.unfinished;
            summary.timewait_unseen = losses.timewait_unseen;
            summary.in_progress = correlator.in_progress() as u64;
        }
    }
    summary.output_lost = session.out.lines_dropped;
    let complete = match format {
        Format::Json if session.out.is_open() => {
            summary.print(format, &mut session.out.buf)?;
            session.out.finish().context("writing to standard output")?
        }
        _ => {
            summary.print(Format::Text, &mut io::stderr().lock())?;
            session.out.finish().context("writing to standard output")?;
            true
        }
    };
    if !complete {
        // Standard output is not being read (or lost lines): say it where it can be seen.
        summary.print(Format::Text, &mut io::stderr().lock())?;
    }
    Ok(())
}

/// What the run prints.
enum View {
    /// Every transition (`--events`).
    Events {
        states: SocketStates,
        printer: Box<EventPrinter>,
        /// Accepted sockets' first transitions, held until their peer is known.
        accepted: AcceptedEnds,
    },
    /// One record per finished connection (the default), and hung teardowns as they happen.
    Teardowns(Box<Teardowns>),
}

struct Teardowns {
    correlator: Correlator,
    printer: TeardownPrinter,
    alert_printer: AlertPrinter,
    /// Records completed by the current event, reused.
    done: Vec<Teardown>,
    alerts: Vec<Alert>,
    /// Who held each socket reported hung, until it is resolved.
    holders: HashMap<(SocketAddr, SocketAddr), Vec<Holder>>,
    /// Alerts on their way out, in order, some waiting for the kernel's word.
    pending: PendingAlerts,
    /// Where checks go (`None` until started, and when hangs are not watched).
    checker: Option<HangChecker>,
    /// Hangs the checks withdrew before they were reported (4-tuple, phase, since): the
    /// resolution or eviction the engine made of one meanwhile is not reported either.
    withdrawn: HashSet<(SocketAddr, SocketAddr, Phase, u64)>,
    leaks: LeakView,
    leaks_shown_ns: u64,
    distributions: Distributions,
    group_by: Option<&'static str>,
    format: Format,
    clock: WallClock,
    metrics: Option<Exported>,
}

/// The metrics and the exposition the server hands out.
struct Exported {
    metrics: Metrics,
    exposition: Arc<Mutex<String>>,
}

/// Turns records into output lines.
struct Session {
    view: View,
    jiffy_ns: u64,
    out: Output,
    transitions: u64,
    timewait_events: u64,
    teardowns: u64,
    hung_alerts: u64,
    /// Hangs whose report waited for a later sweep: too many checks were under way.
    hung_deferred: u64,
    /// Sockets in a teardown state that a census found unfollowed or in another state.
    census_corrected: u64,
    undecodable: u64,
    write_error: Option<io::Error>,
    lag: Lag,
}

impl Session {
    fn new(view: View, jiffy_ns: u64, out: Output) -> Self {
        Self {
            view,
            jiffy_ns,
            out,
            transitions: 0,
            timewait_events: 0,
            teardowns: 0,
            hung_alerts: 0,
            hung_deferred: 0,
            census_corrected: 0,
            undecodable: 0,
            write_error: None,
            lag: Lag::new(),
        }
    }

    fn handle(&mut self, bytes: &[u8]) {
        let record = match Record::decode(bytes, self.jiffy_ns) {
            Ok(record) => record,
            Err(err) => {
                if self.undecodable == 0 {
                    eprintln!(
                        "tcpclose: warning: cannot decode a kernel record ({err}); \
                         such records are counted in the summary"
                    );
                }
                self.undecodable += 1;
                return;
            }
        };
        self.lag.saw(match &record {
            Record::Transition(t) => t.ts_ns,
            Record::Timewait(timer) => timer.ts_ns,
        });
        let result = match record {
            Record::Transition(t) => {
                self.transitions += 1;
                self.on_transition(&t)
            }
            Record::Timewait(timer) => {
                self.timewait_events += 1;
                match &mut self.view {
                    View::Teardowns(t) => {
                        t.correlator.on_timewait(&timer, &mut t.done);
                        self.print_done()
                    }
                    // Timer programs are not attached in this view.
                    View::Events { .. } => Ok(()),
                }
            }
        };
        self.keep_error(result);
    }

    fn on_transition(&mut self, t: &Transition) -> io::Result<()> {
        match &mut self.view {
            View::Events {
                states,
                printer,
                accepted,
            } => {
                let in_old_ns = states.observe(t);
                if self.write_error.is_some() {
                    return Ok(());
                }
                if AcceptedEnds::lacks_peer(t) {
                    return match accepted.hold(*t, in_old_ns) {
                        Some((oldest, ns)) => printer.print(&mut self.out.buf, &oldest, ns),
                        None => Ok(()),
                    };
                }
                if let Some((first, ns)) = accepted.complete(t) {
                    printer.print(&mut self.out.buf, &first, ns)?;
                }
                printer.print(&mut self.out.buf, t, in_old_ns)
            }
            View::Teardowns(td) => {
                if let Some(m) = &mut td.metrics {
                    m.metrics.transition(t.old, t.new);
                }
                td.correlator.on_transition(t, &mut td.done);
                self.print_done()
            }
        }
    }

    /// Prints the accepted sockets' first transitions that waited for their peer until kernel
    /// time `now_ns` (see [`AcceptedEnds`]) as the kernel gave them.
    fn release_accepted(&mut self, now_ns: u64) {
        let View::Events {
            printer, accepted, ..
        } = &mut self.view
        else {
            return;
        };
        let mut result = Ok(());
        for (t, ns) in accepted.expired(now_ns) {
            if result.is_ok() {
                result = printer.print(&mut self.out.buf, &t, ns);
            }
        }
        self.keep_error(result);
    }

    /// Completes what only time completes (see [`Correlator::expire`]) and reports sockets that
    /// have hung, or stopped hanging, since the last call. Returns whether more is due than one
    /// call completes: the caller reads the ring first, then calls again.
    fn expire(&mut self) -> bool {
        let View::Teardowns(t) = &mut self.view else {
            self.release_accepted(now_ns());
            return false;
        };
        let now = now_ns();
        let more = t.correlator.expire(now, &mut t.done);
        t.correlator.poll_hung(now, &mut t.alerts);
        let result = self.print_done();
        self.keep_error(result);
        if let View::Teardowns(t) = &mut self.view
            && !t.alerts.is_empty()
        {
            let mut checks = Vec::new();
            for alert in t.alerts.drain(..) {
                if needs_check(&alert) && !t.pending.has_room() {
                    // Bounded: a first report is made again at a later sweep (the engine
                    // forgets it was due); a repeat waits for its next turn.
                    if let AlertKind::Hung { again: false, .. } = alert.kind {
                        t.correlator.withdraw_hang(alert.key);
                    }
                    self.hung_deferred += 1;
                    continue;
                }
                checks.extend(t.pending.push(alert));
            }
            match &t.checker {
                Some(checker) => checker.ask(checks),
                // Nothing checks: each is reported as the engine has it.
                None => {
                    for check in checks {
                        t.pending.answered(Answer {
                            id: check.id,
                            verdict: Verdict::Unknown,
                            holders: None,
                        });
                    }
                }
            }
        }
        self.release_alerts(false);
        more
    }

    /// Starts the thread that checks hangs (see [`HangChecker`]), when hangs are watched;
    /// returns where its answers come.
    fn start_hang_checks(&mut self) -> Result<Option<AnswerInbox>> {
        let View::Teardowns(t) = &mut self.view else {
            return Ok(None);
        };
        if !t.correlator.watches_hangs() {
            return Ok(None);
        }
        let (checker, answers) = HangChecker::start()?;
        t.checker = Some(checker);
        Ok(Some(answers))
    }

    /// Takes what the hang checker answered: checks, whose alerts it reports once ready, or a
    /// census, whose unfollowed sockets the engine adopts.
    fn on_answers(&mut self, reply: Reply) {
        let View::Teardowns(t) = &mut self.view else {
            return;
        };
        match reply {
            Reply::Answers(answers) => {
                for answer in answers {
                    t.pending.answered(answer);
                }
                self.release_alerts(false);
            }
            Reply::Census(found) => {
                self.census_corrected += t.correlator.reconcile(&found) as u64;
            }
        }
    }

    /// Asks for a census of the kernel's sockets in teardown states, when hangs are checked:
    /// after events were missed or lost, some sockets may not be followed.
    fn census(&mut self) {
        if let View::Teardowns(t) = &self.view
            && let Some(checker) = &t.checker
        {
            checker.census(t.correlator.census_states());
        }
    }

    /// Whether the last census found sockets that the next is to confirm.
    fn census_pending(&self) -> bool {
        matches!(&self.view, View::Teardowns(t) if t.correlator.census_pending())
    }

    /// Whether hang checks are still under way.
    fn checking_hangs(&self) -> bool {
        matches!(&self.view, View::Teardowns(t) if t.pending.checking() > 0)
    }

    /// Reports the alerts that are ready, in order (with `all`, every one, checked or not),
    /// after the kernel's word on each: see [`settle`].
    fn release_alerts(&mut self, all: bool) {
        let View::Teardowns(t) = &mut self.view else {
            return;
        };
        let now = now_ns();
        let mut result = Ok(());
        for (alert, verdict, holders) in t.pending.ready(all) {
            let Some(alert) = settle(
                alert,
                verdict,
                &mut t.correlator,
                &mut t.done,
                &mut t.withdrawn,
                now,
            ) else {
                continue;
            };
            let tuple = (alert.local, alert.remote);
            if let Some(holders) = holders {
                t.holders.insert(tuple, holders);
            }
            let holders = match alert.kind {
                AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => t.holders.remove(&tuple),
                AlertKind::Hung { .. } => t.holders.get(&tuple).cloned(),
            };
            let owned = OwnedAlert {
                alert,
                holders: holders.unwrap_or_default(),
            };
            t.leaks.observe(&owned.alert, owned.holder().as_ref());
            self.hung_alerts += 1;
            if self.write_error.is_none() && result.is_ok() {
                result = t.alert_printer.print(&mut self.out.buf, &owned);
            }
        }
        if t.withdrawn.len() > MAX_PENDING {
            // Withdrawn hangs whose engine never made a resolution: let go of them.
            t.withdrawn.clear();
        }
        self.keep_error(result);
        // Checks may have ended lives (timewait sockets gone).
        let result = self.print_done();
        self.keep_error(result);
    }

    /// Brings the gauges up to date and encodes the exposition for the next scrapes.
    fn refresh_metrics(&mut self, events: EventTotals) {
        let View::Teardowns(t) = &mut self.view else {
            return;
        };
        let Some(m) = &mut t.metrics else {
            return;
        };
        m.metrics.update(
            &t.correlator.state_counts(),
            &t.leaks.hung_by_phase(),
            t.correlator.len(),
            events,
        );
        let text = m.metrics.encode();
        if let Ok(mut exposition) = m.exposition.lock() {
            *exposition = text;
        }
    }

    /// Prints the distributions and the leak view, and starts a new leak interval.
    fn show_aggregates(&mut self) {
        let View::Teardowns(t) = &mut self.view else {
            return;
        };
        let now = now_ns();
        let groups = t.distributions.report(GROUPS_SHOWN);
        let result = print_distributions(
            &mut self.out.buf,
            t.format,
            &t.clock,
            now,
            t.group_by,
            &groups,
        )
        .and_then(|()| {
            let leaks = t.leaks.report(LEAKS_SHOWN);
            t.alert_printer.print_leaks(
                &mut self.out.buf,
                &leaks,
                now,
                now.saturating_sub(t.leaks_shown_ns),
            )
        });
        t.leaks_shown_ns = now;
        self.keep_error(result);
    }

    fn print_done(&mut self) -> io::Result<()> {
        let View::Teardowns(t) = &mut self.view else {
            return Ok(());
        };
        self.teardowns += t.done.len() as u64;
        let mut result = Ok(());
        for teardown in t.done.drain(..) {
            t.distributions.record(&teardown);
            if let Some(m) = &t.metrics {
                m.metrics.teardown(&teardown);
            }
            if self.write_error.is_none() && result.is_ok() {
                result = t.printer.print(&mut self.out.buf, &teardown);
            }
        }
        result
    }

    fn keep_error(&mut self, result: io::Result<()>) {
        if let Err(err) = result
            && self.write_error.is_none()
        {
            self.write_error = Some(err);
        }
    }

    /// Hands this turn's lines to the output thread; returns whether the reader is still there
    /// (a closed pipe, e.g. into `head`, ends the run quietly).
    fn flush(&mut self) -> Result<bool> {
        if let Some(err) = self.write_error.take() {
            return Err(err).context("formatting output");
        }
        self.out.hand_over();
        Ok(self.out.is_open())
    }
}

/// How far the reader falls behind the kernel, measured at the cost of a clock read per drain
/// pass (none per record): the delay of each pass's oldest record, and the largest catch-up.
struct Lag {
    /// Per drain pass that handled records: CLOCK_MONOTONIC at its start minus the oldest
    /// `ts_ns` it handled, i.e. how long that record waited before the correlator got it.
    delays: Histogram<u64>,
    delay_max_ns: u64,
    /// The oldest `ts_ns` handled in the pass under way (`u64::MAX` before the first).
    oldest_ns: u64,
    /// The catch-up under way, if the last pass returned a full batch: records handled so
    /// far, and when its first pass started.
    catching_up: Option<(u64, u64)>,
    /// The largest catch-up so far: records, and ns from the start of its first pass to the
    /// end of its last.
    largest: (u64, u64),
}

impl Lag {
    /// Delays are tracked from 1 us to an hour (longer ones count at an hour; the max stays
    /// exact), to two significant digits.
    const HIGHEST_NS: u64 = 3_600_000_000_000;

    fn new() -> Self {
        Self {
            // The bounds are constants that `new_with_bounds` accepts.
            delays: Histogram::new_with_bounds(1_000, Self::HIGHEST_NS, 2)
                .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!())),
            delay_max_ns: 0,
            oldest_ns: u64::MAX,
            catching_up: None,
            largest: (0, 0),
        }
    }

    /// A record of the pass under way, stamped `ts_ns` in the kernel.
    fn saw(&mut self, ts_ns: u64) {
        self.oldest_ns = self.oldest_ns.min(ts_ns);
    }

    /// A pass that started at `started_ns` handed `drained` records (at most [`BATCH`]); `now`
    /// reads the clock, only when a catch-up ends.
    fn pass(&mut self, started_ns: u64, drained: usize, now: impl FnOnce() -> u64) {
        if drained > 0 {
            // A record stamped after the pass started (it raced the drain) waited no time.
            let delay = started_ns.saturating_sub(self.oldest_ns);
            self.oldest_ns = u64::MAX;
            self.delays.saturating_record(delay.max(1));
            self.delay_max_ns = self.delay_max_ns.max(delay);
        }
        let drained = drained as u64;
        if drained == BATCH as u64 {
            self.catching_up.get_or_insert((0, started_ns)).0 += drained;
        } else if let Some((events, first_ns)) = self.catching_up.take() {
            let events = events + drained;
            if events > self.largest.0 {
                self.largest = (events, now().saturating_sub(first_ns));
            }
        }
    }

    fn fill(&self, summary: &mut Summary) {
        if !self.delays.is_empty() {
            // Two significant digits: a percentile may round up past the exact max.
            summary.delay_p50_ns = self.delays.value_at_quantile(0.5).min(self.delay_max_ns);
            summary.delay_p99_ns = self.delays.value_at_quantile(0.99).min(self.delay_max_ns);
        }
        summary.delay_max_ns = self.delay_max_ns;
        // A catch-up that the end of tracing cut short has no end to time: not counted.
        (
            summary.largest_backlog_events,
            summary.largest_backlog_drain_ns,
        ) = self.largest;
    }
}

/// CLOCK_MONOTONIC now, the clock of the kernel's timestamps.
pub(crate) fn now_ns() -> u64 {
    u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// Follows the sockets already in a teardown state (a process may have been leaking CLOSE_WAIT
/// for an hour): the programs are attached, so anything that changes after this snapshot is in
/// the ring, and the engine reconciles the two (see [`Correlator::adopt_existing`]).
fn adopt_existing(correlator: &mut Correlator, filter: &KernelFilter) {
    let seen_ns = now_ns();
    match sockets::snapshot_all_namespaces() {
        Ok(found) => {
            for s in found
                .iter()
                .filter(|s| filter.admits(s.family, s.local.port(), s.remote.port()))
            {
                correlator.adopt_existing(&ExistingSocket {
                    family: s.family,
                    local: s.local,
                    remote: s.remote,
                    state: s.state,
                    seen_ns,
                });
            }
        }
        Err(err) => eprintln!(
            "tcpclose: warning: cannot list the sockets that predate tracing ({err:#}); \
             hung sockets among them will not be reported"
        ),
    }
}

/// What becomes of `alert` given the kernel's word on it (see [`HangChecker`]); `None`: not
/// reported. A hang the kernel does not show (gone, or in another state: the engine missed the
/// transition that ended it, e.g. a program run the kernel skipped) is dropped when it was about
/// to be reported for the first time, and the engine is corrected; one reported before is
/// resolved now, at the latest, so that the hung gauges and the owners kept for it let go of it.
/// An answer about a hang the engine has moved past since it asked is stale: it changes nothing
/// in the engine, and a first report it drops takes the engine's resolution of it along.
fn settle(
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

/// Where the hang checks' answers come.
type AnswerInbox = tokio::sync::mpsc::UnboundedReceiver<Reply>;

/// The next answers, or never when hangs are not checked.
async fn next_answers(inbox: &mut Option<AnswerInbox>) -> Option<Reply> {
    match inbox {
        Some(inbox) => inbox.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A pass at `start` of `records` stamped `ts`, ending at `end`.
    fn pass(lag: &mut Lag, start: u64, ts: &[u64], drained: usize, end: u64) {
        for &t in ts {
            lag.saw(t);
        }
        lag.pass(start, drained, || end);
    }

    /// An engine following a server socket whose peer closed at 1 s (CLOSE_WAIT, hung after
    /// the default 60 s), and the alerts of a sweep at each of `sweeps` (seconds).
    fn close_wait_leak(sweeps: &[u64]) -> (Correlator, Vec<Vec<Alert>>) {
        use tcpclose::{
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
        let mut leaks = tcpclose::hung::LeakView::default();
        leaks.observe(&alerts[0][0], None);
        let close_wait = |leaks: &tcpclose::hung::LeakView| {
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
        let confirmed = Verdict::Confirmed { inode: 5 };
        assert_eq!(
            settle_one(&mut correlator, &alerts[0][0], confirmed).as_ref(),
            Some(&alerts[0][0])
        );
    }

    #[test]
    fn a_stale_answer_changes_nothing_and_takes_the_resolution_along() {
        use tcpclose::event::{Family, Task, TcpState::*, Transition};
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

    #[test]
    fn delay_is_the_oldest_record_of_each_pass() {
        let mut lag = Lag::new();
        // Out of order across CPUs: the oldest counts.
        pass(
            &mut lag,
            100 * MS,
            &[95 * MS, 90 * MS, 99 * MS],
            3,
            100 * MS,
        );
        // Empty passes record nothing.
        pass(&mut lag, 150 * MS, &[], 0, 150 * MS);
        pass(&mut lag, 200 * MS, &[199 * MS], 1, 200 * MS);
        // Stamped after the pass started: no delay.
        pass(&mut lag, 300 * MS, &[301 * MS], 1, 301 * MS);
        let mut summary = Summary::default();
        lag.fill(&mut summary);
        assert_eq!(summary.delay_max_ns, 10 * MS);
        assert!(summary.delay_p50_ns.abs_diff(MS) <= MS / 50, "{summary:?}");
        assert_eq!(summary.delay_p99_ns, 10 * MS);
        assert_eq!(summary.largest_backlog_events, 0);
        assert_eq!(summary.largest_backlog_drain_ns, 0);
    }

    #[test]
    fn largest_catch_up_is_kept() {
        let mut lag = Lag::new();
        // Two full passes and a short one: 2 * BATCH + 10 records from 1 s to 1.03 s.
        pass(&mut lag, 1_000 * MS, &[900 * MS], BATCH, 1_010 * MS);
        pass(&mut lag, 1_010 * MS, &[950 * MS], BATCH, 1_020 * MS);
        pass(&mut lag, 1_020 * MS, &[1_000 * MS], 10, 1_030 * MS);
        // A smaller one later does not replace it.
        pass(&mut lag, 2_000 * MS, &[1_990 * MS], BATCH, 2_001 * MS);
        pass(&mut lag, 2_001 * MS, &[], 0, 2_002 * MS);
        let mut summary = Summary::default();
        lag.fill(&mut summary);
        assert_eq!(summary.largest_backlog_events, 2 * BATCH as u64 + 10);
        assert_eq!(summary.largest_backlog_drain_ns, 30 * MS);
        assert_eq!(summary.delay_max_ns, 100 * MS);
        // A single short pass is no catch-up.
        let mut lag = Lag::new();
        pass(&mut lag, MS, &[0], BATCH - 1, 2 * MS);
        let mut summary = Summary::default();
        lag.fill(&mut summary);
        assert_eq!(summary.largest_backlog_events, 0);
    }
}
