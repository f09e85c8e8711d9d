//! One tracing run: attach, drain the ring buffer until told to stop, detach, summarise.

use std::{
    io::{self, BufWriter, IsTerminal as _, Write},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tcpclose::{
    event::{Record, Transition},
    render::{EventPrinter, Format, Summary, TeardownPrinter, WallClock, clock_ns},
    states::SocketStates,
    teardown::{Correlator, Teardown},
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{cli::Cli, tracer::Tracer};

/// How often the ring buffer is drained when the kernel program has not asked for it (it only
/// wakes the consumer once a backlog builds up). Bounds the delay from kernel to output.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Records handled before the loop checks its other work (signals, deadline) again.
const BATCH: usize = 4096;

pub async fn run(cli: Cli) -> Result<()> {
    let format = if cli.json { Format::Json } else { Format::Text };
    let mut tracer = Tracer::attach(&cli.kernel_filter(), cli.ring_bytes, !cli.events)?;
    let started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let deadline = tokio::time::sleep(cli.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let view = if cli.events {
        View::Events {
            states: SocketStates::new(cli.max_sockets),
            printer: EventPrinter::new(format, WallClock::now()),
        }
    } else {
        let colour = format == Format::Text && io::stdout().is_terminal();
        View::Teardowns {
            correlator: Correlator::new(cli.max_sockets),
            printer: TeardownPrinter::new(format, WallClock::now(), colour),
            done: Vec::new(),
        }
    };
    let mut session = Session::new(view, tracer.timewait_jiffy_ns().unwrap_or(0));
    if cli.events {
        eprintln!("Tracing TCP state changes... Hit Ctrl-C to end.");
    } else {
        eprintln!("Tracing TCP teardowns... Hit Ctrl-C to end.");
    }

    let mut drained = 0;
    loop {
        tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline, if cli.duration.is_some() => break,
            // The previous drain stopped at its cap: go on after letting other tasks run.
            () = tokio::task::yield_now(), if drained == BATCH => {}
            ready = tracer.backlog() => ready.context("waiting on the ring buffer")?,
            _ = tick.tick() => {}
        }
        drained = tracer.drain(BATCH, |record| session.handle(record));
        if drained < BATCH {
            // Caught up with the kernel: what only time completes is due now.
            session.expire();
        }
        if !session.flush()? {
            break;
        }
    }

    // Detach first, then read what the program submitted before it was detached.
    tracer.detach();
    while tracer.drain(BATCH, |record| session.handle(record)) > 0 {}
    session.expire();
    session.flush()?;
    let counters = tracer.counters()?;
    let mut summary = Summary {
        transitions: session.transitions,
        lost: counters.lost,
        matched: counters.matched,
        undecodable: session.undecodable,
        timewait_events: session.timewait_events,
        timewait_lost: counters.timewait_lost,
        teardowns: session.teardowns,
        duration_ns: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
        ..Summary::default()
    };
    match &session.view {
        View::Events { states, .. } => summary.untracked = states.untracked(),
        View::Teardowns { correlator, .. } => {
            let losses = correlator.losses();
            summary.evicted = losses.evicted;
            summary.unfinished = losses.unfinished;
            summary.timewait_unseen = losses.timewait_unseen;
            summary.in_progress = correlator.in_progress() as u64;
        }
    }
    match format {
        Format::Json if session.output_open => {
            summary.print(format, &mut session.out)?;
            session.out.flush()?;
        }
        _ => summary.print(Format::Text, &mut io::stderr().lock())?,
    }
    Ok(())
}

/// What the run prints.
enum View {
    /// Every transition (`--events`).
    Events {
        states: SocketStates,
        printer: EventPrinter,
    },
    /// One record per finished connection (the default).
    Teardowns {
        correlator: Correlator,
        printer: TeardownPrinter,
        /// Records completed by the current event, reused.
        done: Vec<Teardown>,
    },
}

/// Turns records into output lines.
struct Session {
    view: View,
    jiffy_ns: u64,
    out: BufWriter<io::StdoutLock<'static>>,
    transitions: u64,
    timewait_events: u64,
    teardowns: u64,
    undecodable: u64,
    /// False once stdout is closed (e.g. piped into `head`): tracing stops.
    output_open: bool,
    write_error: Option<io::Error>,
}

impl Session {
    fn new(view: View, jiffy_ns: u64) -> Self {
        Self {
            view,
            jiffy_ns,
            out: BufWriter::with_capacity(64 << 10, io::stdout().lock()),
            transitions: 0,
            timewait_events: 0,
            teardowns: 0,
            undecodable: 0,
            output_open: true,
            write_error: None,
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
                self.transitions += 1;
                self.on_transition(&t)
            }
            Record::Timewait(timer) => {
                self.timewait_events += 1;
                match &mut self.view {
                    View::Teardowns {
                        correlator, done, ..
                    } => {
                        correlator.on_timewait(&timer, done);
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
            View::Events { states, printer } => {
                let in_old_ns = states.observe(t);
                if self.write_error.is_some() {
                    return Ok(());
                }
                printer.print(&mut self.out, t, in_old_ns)
            }
            View::Teardowns {
                correlator, done, ..
            } => {
                correlator.on_transition(t, done);
                self.print_done()
            }
        }
    }

    /// Completes what only time completes (see [`Correlator::expire`]).
    fn expire(&mut self) {
        if let View::Teardowns {
            correlator, done, ..
        } = &mut self.view
        {
            let now = u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0);
            correlator.expire(now, done);
            let result = self.print_done();
            self.keep_error(result);
        }
    }

    fn print_done(&mut self) -> io::Result<()> {
        let View::Teardowns { printer, done, .. } = &mut self.view else {
            return Ok(());
        };
        self.teardowns += done.len() as u64;
        let mut result = Ok(());
        for teardown in done.drain(..) {
            if self.write_error.is_none() && result.is_ok() {
                result = printer.print(&mut self.out, &teardown);
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

    /// Flushes output; returns whether it is still open. A closed pipe ends the run quietly;
    /// other write errors are errors.
    fn flush(&mut self) -> Result<bool> {
        let result = match self.write_error.take() {
            Some(err) => Err(err),
            None => self.out.flush(),
        };
        match result {
            Ok(()) => Ok(self.output_open),
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
                self.output_open = false;
                // Further writes would fail the same way.
                self.write_error = Some(io::Error::from(io::ErrorKind::BrokenPipe));
                Ok(false)
            }
            Err(err) => Err(err).context("writing to standard output"),
        }
    }
}
