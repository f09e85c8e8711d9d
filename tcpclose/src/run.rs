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
    event::TcpState,
    event::{Record, Transition},
    hung::{Alert, AlertKind, Holder, LeakView, SocketKey},
    render::{
        AlertPrinter, EventPrinter, Format, OwnedAlert, Summary, TeardownPrinter, WallClock,
        clock_ns, print_distributions,
    },
    states::SocketStates,
    stats::Distributions,
    teardown::{Correlator, ExistingSocket, Phase, TIMEWAIT_LEN_NS, Teardown},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
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
        let mut result = self.print_done();
        if let View::Teardowns(t) = &mut self.view
            && !t.alerts.is_empty()
        {
            let (alerts, confirmed) = confirm(
                std::mem::take(&mut t.alerts),
                &mut t.correlator,
                &mut t.done,
                now,
            );
            let alerts = attribute(alerts, &confirmed, &mut t.holders);
            for a in &alerts {
                t.leaks.observe(&a.alert, a.holder().as_ref());
                if self.write_error.is_none() && result.is_ok() {
                    result = t.alert_printer.print(&mut self.out.buf, a);
                }
            }
            self.hung_alerts += alerts.len() as u64;
        }
        self.keep_error(result);
        more
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
fn now_ns() -> u64 {
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

/// Checks hangs with sock_diag before reporting them, where the engine's view may be wrong:
/// - a full socket (or one found at start-up) whose last transition the kernel skipped (the
///   summary's `missed`) seems to hang in its last seen state. sock_diag showing its 4-tuple in
///   that state confirms the hang; showing it in another state means the engine is behind (not
///   reported this time); showing nothing means it is gone: dropped, counted unfinished.
/// - see [`confirm_fin_wait2`] for timewait sockets.
///
/// Many hangs at once (a leak building up) are checked against one snapshot of every namespace
/// rather than a lookup each.
fn confirm(
    alerts: Vec<Alert>,
    correlator: &mut Correlator,
    done: &mut Vec<Teardown>,
    now_ns: u64,
) -> (Vec<Alert>, Confirmed) {
    let full_hang = |a: &Alert| {
        matches!(a.kind, AlertKind::Hung { .. })
            && matches!(a.key, SocketKey::Full(_) | SocketKey::Existing(..))
    };
    let snapshot: Option<HashMap<(SocketAddr, SocketAddr), Vec<sockets::SocketInfo>>> =
        (alerts.iter().filter(|a| full_hang(a)).count() > 8)
            .then(sockets::snapshot_all_namespaces)
            .and_then(Result::ok)
            .map(|all| {
                let mut by_tuple: HashMap<_, Vec<_>> = HashMap::new();
                for i in all.into_iter().filter(|i| !i.timewait) {
                    by_tuple.entry((i.local, i.remote)).or_default().push(i);
                }
                by_tuple
            });
    let mut confirmed = Confirmed::new();
    let alerts = alerts
        .into_iter()
        .filter_map(|a| {
            if !full_hang(&a) {
                return Some(a);
            }
            let found: Vec<sockets::SocketInfo> = match &snapshot {
                Some(by_tuple) => by_tuple
                    .get(&(a.local, a.remote))
                    .cloned()
                    .unwrap_or_default(),
                None => match sockets::lookup_all_namespaces(a.local, a.remote) {
                    Ok(found) => found.into_iter().filter(|i| !i.timewait).collect(),
                    // Cannot tell: report it.
                    Err(_) => return Some(a),
                },
            };
            // Containers reuse addresses (127.0.0.1 in each): of the sockets with this 4-tuple
            // in any namespace, the one in the hung state.
            if let Some(info) = found.iter().find(|i| i.state == a.phase.state()) {
                confirmed.insert((a.local, a.remote), info.inode);
                return Some(a);
            }
            if found.is_empty() {
                correlator.socket_gone(a.key);
            } else {
                correlator.withdraw_hang(a.key);
            }
            ended_unseen(a)
        })
        .collect();
    (
        confirm_fin_wait2(alerts, correlator, done, now_ns),
        confirmed,
    )
}

/// What becomes of hang alert `a` when sock_diag no longer shows its socket in the hung state
/// (gone, or in another state): the engine missed the transition that ended the hang. A hang not
/// reported yet is dropped: there is nothing to take back. One reported before is resolved now,
/// at the latest, so that the hung gauges and the owners kept for it let go of it (they count
/// it hung until a resolution).
fn ended_unseen(a: Alert) -> Option<Alert> {
    match a.kind {
        AlertKind::Hung {
            age_ns,
            again: true,
        } => Some(Alert {
            kind: AlertKind::Resolved { stuck_ns: age_ns },
            ..a
        }),
        _ => None,
    }
}

/// The inode of each full socket whose hang sock_diag confirmed, by 4-tuple (0 for an orphan:
/// no file refers to it).
type Confirmed = HashMap<(SocketAddr, SocketAddr), u64>;

/// Checks the FIN_WAIT2 hangs of timewait sockets with sock_diag before reporting them. The
/// peer's FIN moves a timewait socket from FIN_WAIT2 to TIME_WAIT without a timer event when
/// tcp_timewait_state_process() re-arms the timer within its wheel bucket (2 s wide at 60 s
/// and HZ=250), so the engine cannot tell a live orphan from one the FIN has already released.
/// sock_diag can: a socket it shows in TIME_WAIT is withdrawn (not reported) and the engine is
/// told when TIME_WAIT began, from the timer's remaining time.
fn confirm_fin_wait2(
    alerts: Vec<Alert>,
    correlator: &mut Correlator,
    done: &mut Vec<Teardown>,
    now_ns: u64,
) -> Vec<Alert> {
    alerts
        .into_iter()
        .filter(|a| {
            let (SocketKey::Timewait(tw), Phase::FinWait2, AlertKind::Hung { .. }) =
                (a.key, a.phase, a.kind)
            else {
                return true;
            };
            let Ok(found) = sockets::lookup_all_namespaces(a.local, a.remote) else {
                // Cannot tell: report it.
                return true;
            };
            let timewait: Vec<&sockets::SocketInfo> = found.iter().filter(|i| i.timewait).collect();
            if timewait.iter().any(|i| i.state == TcpState::FinWait2) {
                return true;
            }
            match timewait
                .iter()
                .filter(|i| i.state == TcpState::TimeWait)
                .find_map(|i| i.timewait_remaining_ms())
            {
                Some(remaining_ms) => {
                    let elapsed_ns =
                        TIMEWAIT_LEN_NS.saturating_sub(u64::from(remaining_ms) * 1_000_000);
                    !correlator.timewait_in_time_wait(tw, now_ns.saturating_sub(elapsed_ns))
                }
                // No timewait socket has this 4-tuple any more: the one followed ended without
                // an end tcpclose could read as such (killed by a new connection on the same
                // 4-tuple while its events raced). Not hung: gone.
                None => {
                    correlator.timewait_gone(tw, now_ns, done);
                    false
                }
            }
        })
        .collect()
}

/// Names the processes holding newly hung sockets, the way `ss -p` does (the inode from
/// sock_diag, which [`confirm`] already asked, `/proc/*/fd` for the holders), once per batch of
/// alerts. Sockets reported again and
/// resolved ones keep the holders found the first time.
fn attribute(
    alerts: Vec<Alert>,
    confirmed: &Confirmed,
    known: &mut HashMap<(SocketAddr, SocketAddr), Vec<Holder>>,
) -> Vec<OwnedAlert> {
    let mut inodes: HashMap<(SocketAddr, SocketAddr), u64> = HashMap::new();
    for a in &alerts {
        // Timewait sockets have no file, hence no holder.
        if !matches!(a.kind, AlertKind::Hung { again: false, .. })
            || matches!(a.key, SocketKey::Timewait(_))
        {
            continue;
        }
        let tuple = (a.local, a.remote);
        // Found by `confirm`, or looked up here when it could not tell.
        let inode = match confirmed.get(&tuple) {
            Some(&inode) => inode,
            None => sockets::lookup_all_namespaces(a.local, a.remote)
                .ok()
                .and_then(|found| {
                    found
                        .iter()
                        .find(|i| !i.timewait && i.state == a.phase.state())
                        .map(|i| i.inode)
                })
                .unwrap_or(0),
        };
        if inode != 0 {
            inodes.insert(tuple, inode);
        }
    }
    if !inodes.is_empty() {
        let wanted: HashSet<u64> = inodes.values().copied().collect();
        match sockets::ProcessIndex::scan(&wanted) {
            Ok(index) => {
                for (tuple, inode) in &inodes {
                    known.insert(*tuple, index.owners_of(*inode).to_vec());
                }
            }
            Err(err) => eprintln!("tcpclose: warning: cannot read /proc to name owners: {err:#}"),
        }
    }
    alerts
        .into_iter()
        .map(|alert| {
            let tuple = (alert.local, alert.remote);
            let holders = match alert.kind {
                AlertKind::Resolved { .. } | AlertKind::Evicted { .. } => known.remove(&tuple),
                AlertKind::Hung { .. } => known.get(&tuple).cloned(),
            };
            OwnedAlert {
                alert,
                holders: holders.unwrap_or_default(),
            }
        })
        .collect()
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

    fn hang(again: bool) -> Alert {
        Alert {
            kind: AlertKind::Hung {
                age_ns: 90_000 * MS,
                again,
            },
            phase: Phase::CloseWait,
            ts_ns: 100_000 * MS,
            since_ns: 10_000 * MS,
            since_is_lower_bound: false,
            family: tcpclose::event::Family::Ipv4,
            local: "10.0.0.1:80".parse().unwrap(),
            remote: "10.0.0.2:5000".parse().unwrap(),
            owner: None,
            key: SocketKey::Full(0xffff_0000),
        }
    }

    #[test]
    fn a_reported_hang_that_ended_unseen_is_resolved() {
        let resolved = ended_unseen(hang(true)).expect("resolved");
        assert_eq!(
            resolved.kind,
            AlertKind::Resolved {
                stuck_ns: 90_000 * MS
            }
        );
        assert_eq!(resolved.local, hang(true).local);
        assert_eq!(resolved.key, hang(true).key);
        // Fed to the leak view, it takes back the hang reported before.
        let mut leaks = tcpclose::hung::LeakView::default();
        leaks.observe(&hang(false), None);
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
    fn a_hang_never_reported_that_ended_unseen_is_dropped() {
        assert!(ended_unseen(hang(false)).is_none());
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
