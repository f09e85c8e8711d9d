//! One tracing run: attach, drain the ring buffer until told to stop, detach, summarise.

use std::{
    io::{self, BufWriter, Write},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tcpclose::{
    event::Transition,
    render::{EventPrinter, Format, Summary, WallClock},
    states::SocketStates,
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
    let mut tracer = Tracer::attach(&cli.kernel_filter(), cli.ring_bytes)?;
    let started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let deadline = tokio::time::sleep(cli.duration.unwrap_or(Duration::MAX / 4));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut session = Session::new(format, cli.max_sockets);
    eprintln!("Tracing TCP state changes... Hit Ctrl-C to end.");

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
        if !session.flush()? {
            break;
        }
    }

    // Detach first, then read what the program submitted before it was detached.
    tracer.detach();
    while tracer.drain(BATCH, |record| session.handle(record)) > 0 {}
    session.flush()?;
    let counters = tracer.counters()?;
    let summary = Summary {
        transitions: session.transitions,
        lost: counters.lost,
        matched: counters.matched,
        undecodable: session.undecodable,
        untracked: session.states.untracked(),
        duration_ns: u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX),
    };
    match format {
        Format::Json if session.output_open => {
            summary.print(format, &mut session.out)?;
            session.out.flush()?;
        }
        _ => summary.print(Format::Text, &mut io::stderr().lock())?,
    }
    Ok(())
}

/// Turns records into output lines.
struct Session {
    states: SocketStates,
    printer: EventPrinter,
    out: BufWriter<io::StdoutLock<'static>>,
    transitions: u64,
    undecodable: u64,
    /// False once stdout is closed (e.g. piped into `head`): tracing stops.
    output_open: bool,
    write_error: Option<io::Error>,
}

impl Session {
    fn new(format: Format, max_sockets: usize) -> Self {
        Self {
            states: SocketStates::new(max_sockets),
            printer: EventPrinter::new(format, WallClock::now()),
            out: BufWriter::with_capacity(64 << 10, io::stdout().lock()),
            transitions: 0,
            undecodable: 0,
            output_open: true,
            write_error: None,
        }
    }

    fn handle(&mut self, record: &[u8]) {
        let transition = match Transition::decode(record) {
            Ok(transition) => transition,
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
        self.transitions += 1;
        let in_old_ns = self.states.observe(&transition);
        if self.write_error.is_none()
            && let Err(err) = self.printer.print(&mut self.out, &transition, in_old_ns)
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
