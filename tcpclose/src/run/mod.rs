//! One tracing run: attach, drain the ring buffer into the output mode's pipeline until told to
//! stop, detach, summarise.

mod lag;

use std::{
    io::{self, IsTerminal as _},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cgroups::Cgroups,
    clock::now_ns,
    event::Record,
    metrics::{self, EventTotals, Metrics},
    output::Output,
    pipeline::{AnswerInbox, Events, Exported, Pipeline, Teardowns},
    render::{Format, Summary},
    settings::{Mode, Settings, TeardownSettings},
    sockets, system,
    teardown::{Correlator, ExistingSocket},
    tracer::{KernelFilter, Tracer},
};
use lag::Lag;

/// How often the metrics exposition is refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(1);
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

/// Runs tcpclose as `settings` say, until the duration ends, SIGINT or SIGTERM, or standard
/// output is closed.
pub async fn run(settings: Settings) -> Result<()> {
    // The metrics address first: a busy port is a mistake to report before loading anything.
    let metrics_listener = match &settings.mode {
        Mode::Teardowns(TeardownSettings {
            metrics: Some(addr),
            ..
        }) => Some(metrics::bind(*addr)?),
        _ => None,
    };
    let tracer = Tracer::attach(
        &settings.filter,
        settings.ring_bytes,
        settings.follows_timewait(),
        settings.btf.as_deref(),
        settings.kernel_log,
        settings.programs,
    )?;
    match &settings.mode {
        Mode::Events => {
            let pipeline = Events::new(settings.format, settings.max_sockets)
                .with_cgroups(Cgroups::of_host())
                .owned_by(settings.pids.clone());
            drive(&settings, tracer, pipeline, None, None).await
        }
        Mode::Teardowns(teardown) => {
            // The run loop refreshes the exposition every second; scrapes read the last one.
            let metrics = match metrics_listener {
                Some(listener) => {
                    let mut m = Metrics::at_start().ran(tracer.programs().name());
                    if let Some((by, top)) = teardown.metrics_label {
                        m = m.labelled(by, top);
                    }
                    // Every metric, at zero, from the first scrape on: a scrape may come before
                    // the run loop's first refresh.
                    let exposition = Arc::new(Mutex::new(m.encode()));
                    let server = metrics::serve(listener, exposition.clone())?;
                    tokio::spawn(server);
                    Some(Exported {
                        metrics: m,
                        exposition,
                    })
                }
                None => None,
            };
            let mut correlator =
                Correlator::watching(settings.max_sockets, teardown.thresholds).in_kernel_order();
            if settings.filter.skip_established {
                correlator = correlator.without_handshake_ends();
            }
            let reasons = tracer.reset_reasons().cloned();
            if reasons.is_some() {
                correlator = correlator.explaining_resets();
            }
            if !teardown.thresholds.is_empty() {
                adopt_existing(&mut correlator, &settings.filter);
            }
            let colour = settings.format == Format::Text && io::stdout().is_terminal();
            let pipeline = Teardowns::new(
                correlator,
                teardown,
                settings.format,
                colour,
                metrics,
                Cgroups::of_host(),
                now_ns(),
            )
            .owned_by(settings.pids.clone())
            .naming_reset_reasons(reasons.unwrap_or_default());
            let refresh = teardown.metrics.map(|_| METRICS_REFRESH);
            drive(&settings, tracer, pipeline, teardown.interval, refresh).await
        }
    }
}

/// The run loop: drains the ring into `pipeline` until the end, then detaches and summarises.
/// `interval`: how often the pipeline shows its aggregates; `refresh`: its metrics.
async fn drive<P: Pipeline>(
    settings: &Settings,
    mut tracer: Tracer,
    pipeline: P,
    interval: Option<Duration>,
    refresh: Option<Duration>,
) -> Result<()> {
    let started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let deadline = tokio::time::sleep(settings.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut aggregates = every(interval);
    // The first tick is immediate.
    aggregates.tick().await;
    let mut metrics = every(refresh);
    let mut tick = every(Some(POLL_INTERVAL));
    let mut census = every(Some(CENSUS_INTERVAL));

    // Attached, listening, snapshot taken: what is left needs few privileges.
    system::drop_capabilities()?;
    let out = Output::stdout().context("starting the output thread")?;
    let mut session = Session::new(pipeline, tracer.timewait_jiffy_ns().unwrap_or(0), out);
    // After the capabilities are dropped: the thread inherits what is left.
    let mut answers = session.pipeline.start_hang_checks()?;
    // Events missed or lost at the last census.
    let mut census_gaps = 0;
    match settings.mode {
        Mode::Events => eprintln!("Tracing TCP state changes... Hit Ctrl-C to end."),
        Mode::Teardowns(_) => eprintln!("Tracing TCP teardowns... Hit Ctrl-C to end."),
    }

    // The last drain stopped at its cap, or more than one pass completes was due.
    let mut behind = false;
    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline, if settings.duration.is_some() => break,
            // Work left from the last pass: go on after letting other tasks run.
            () = tokio::task::yield_now(), if behind => {}
            ready = tracer.backlog() => ready.context("waiting on the ring buffer")?,
            _ = aggregates.tick(), if interval.is_some() => session.show_aggregates(),
            _ = metrics.tick(), if refresh.is_some() => {
                let counters = tracer.counters()?;
                session.pipeline.refresh_metrics(EventTotals {
                    matched: counters.matched + counters.timewait_matched + counters.cause_matched,
                    received: session.transitions
                        + session.timewait_events
                        + session.cause_events
                        + session.undecodable,
                    lost: counters.lost + counters.timewait_lost + counters.cause_lost,
                    missed: tracer.missed()?,
                });
            }
            Some(reply) = next_answers(&mut answers) => {
                let result = session.pipeline.on_answers(reply, &mut session.out.buf);
                session.keep_error(result);
            }
            _ = census.tick(), if answers.is_some() => {
                // Events missed or lost since the last census: some sockets may be unfollowed or
                // followed in a state they have left. What a census finds, the next confirms.
                let counters = tracer.counters()?;
                let gaps = tracer.missed()? + counters.lost + counters.timewait_lost;
                if gaps > census_gaps || session.pipeline.census_pending() {
                    census_gaps = gaps;
                    session.pipeline.census();
                }
            }
            _ = tick.tick() => {}
        }
        tracer.flush_logs();
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
    tracer.flush_logs();
    while session.expire() {}
    // The hang checks under way are answered before the summary, for a while.
    let checks_due = tokio::time::sleep(FINAL_CHECKS);
    tokio::pin!(checks_due);
    while session.pipeline.checking_hangs() {
        tokio::select! {
            Some(reply) = next_answers(&mut answers) => {
                let result = session.pipeline.on_answers(reply, &mut session.out.buf);
                session.keep_error(result);
            }
            _ = &mut checks_due => break,
        }
    }
    let result = session.pipeline.finish(&mut session.out.buf);
    session.keep_error(result);
    let result = session
        .pipeline
        .show_final_aggregates(now_ns(), &mut session.out.buf);
    session.keep_error(result);
    session.flush()?;
    let counters = tracer.counters()?;
    let mut summary = Summary {
        programs: tracer.programs().name(),
        transitions: session.transitions,
        lost: counters.lost,
        matched: counters.matched,
        missed,
        undecodable: session.undecodable,
        timewait_matched: counters.timewait_matched,
        timewait_events: session.timewait_events,
        timewait_lost: counters.timewait_lost,
        cause_matched: counters.cause_matched,
        cause_events: session.cause_events,
        cause_lost: counters.cause_lost,
        duration_ns: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        ..Summary::default()
    };
    session.lag.fill(&mut summary);
    session.pipeline.fill_summary(&mut summary);
    summary.output_lost = session.out.lines_dropped;
    let complete = match settings.format {
        Format::Json if session.out.is_open() => {
            summary.print(Format::Json, &mut session.out.buf)?;
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

/// A timer ticking every `period`, or never.
fn every(period: Option<Duration>) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period.unwrap_or(Duration::MAX / 4));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// The next answers of the hang checks, or never when hangs are not checked.
async fn next_answers(inbox: &mut Option<AnswerInbox>) -> Option<crate::hang_check::Reply> {
    match inbox {
        Some(inbox) => inbox.recv().await,
        None => std::future::pending().await,
    }
}

/// Decodes records for a pipeline, keeps the run's counts and hands the lines to the output.
struct Session<P> {
    pipeline: P,
    jiffy_ns: u64,
    out: Output,
    transitions: u64,
    timewait_events: u64,
    cause_events: u64,
    undecodable: u64,
    write_error: Option<io::Error>,
    lag: Lag,
}

impl<P: Pipeline> Session<P> {
    fn new(pipeline: P, jiffy_ns: u64, out: Output) -> Self {
        Self {
            pipeline,
            jiffy_ns,
            out,
            transitions: 0,
            timewait_events: 0,
            cause_events: 0,
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
        let result = match record {
            Record::Transition(t) => {
                self.lag.saw(t.ts_ns);
                self.transitions += 1;
                self.pipeline.on_transition(&t, &mut self.out.buf)
            }
            Record::Timewait(timer) => {
                self.lag.saw(timer.ts_ns);
                self.timewait_events += 1;
                self.pipeline.on_timewait(&timer, &mut self.out.buf)
            }
            Record::Cause(cause) => {
                self.lag.saw(cause.ts_ns);
                self.cause_events += 1;
                self.pipeline.on_cause(&cause, &mut self.out.buf)
            }
        };
        self.keep_error(result);
    }

    /// See [`Pipeline::expire`].
    fn expire(&mut self) -> bool {
        let (more, result) = self.pipeline.expire(now_ns(), &mut self.out.buf);
        self.keep_error(result);
        more
    }

    fn show_aggregates(&mut self) {
        let result = self.pipeline.show_aggregates(now_ns(), &mut self.out.buf);
        self.keep_error(result);
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
                    placement: s.placement(),
                });
            }
        }
        Err(err) => eprintln!(
            "tcpclose: warning: cannot list the sockets that predate tracing ({err:#}); \
             hung sockets among them will not be reported"
        ),
    }
}
