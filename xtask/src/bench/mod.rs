//! `cargo xtask bench`: what tracing costs a host that churns TCP connections, and how tcpclose
//! holds up under stress.
//!
//! Several client/server pairs churn loopback connections in a network namespace of the bench's
//! own (a fresh one per measurement), untraced, under `tcpclose` (teardowns: the transition
//! program plus the timer programs that follow timewait sockets and must reject every other
//! kernel timer), under `tcpclose --events` (the transition program alone) and under
//! libbpf-tools' `tcpstates` when it is installed, interleaved over several rounds on one
//! machine. The tracers run in the host namespace (their tracepoints are global) with their
//! output going to files.
//!
//! The churn rates are measured with `kernel.bpf_stats_enabled` off (statistics add two clock
//! reads to every program run); each traced mode is measured once more per round with it on, for
//! its kernel programs' run time. Each round also measures `tcpclose --json` under stress: a
//! burst of churn on an idle tracer (events lost), the tracer stopped for 500 ms under churn
//! (how fast it drains the backlog), and its memory while it follows 100k open sockets.
//!
//! It prints the medians as markdown tables: churn rate relative to untraced, and per tracer the
//! events it delivered, lost, its CPU time, its kernel programs' time, its wakeups and its peak
//! memory; then the stress figures against their targets.
//!
//! This file runs the rounds and the churn measurements; the stress parts are in [`stress`] and
//! [`hung_burst`], the helper processes that hold connections in [`holder`], the tracer in
//! [`tracer`], what the kernel says it used in [`usage`], the tables in [`report`]. The network
//! namespaces, the churn and the tracer's process come from the tests library
//! (`tcpclose_tests`), shared with the integration tests.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tcpclose_tests::{TempDir, churn, netns::Netns};

mod files;
mod holder;
mod hung_burst;
mod report;
mod stress;
mod tracer;
mod usage;

pub(crate) use files::{read_proc, status_field};
pub use holder::hold_connections;
use hung_burst::HungBurst;
use report::{ms, number};
use stress::{Burst, Held, Stopped};
pub(crate) use tracer::{Lag, Tracer, lag_of, summary};
use usage::{process_usage, program_runs, runs_between};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// How long a tracer may take to attach before the bench gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a tracer, or a helper process, may take to exit once told to.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// After the churn, the time the tracer gets to drain what the kernel already handed it, so that
/// its CPU time covers the events it delivers.
const DRAIN: Duration = Duration::from_millis(300);
/// After a measurement's namespace is deleted, the time the kernel gets to tear it down (and its
/// timewait sockets) before the next measurement starts.
const SETTLE: Duration = Duration::from_millis(500);

/// What `cargo xtask bench` was asked for.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub pairs: usize,
    /// The parts to run (all when empty).
    pub only: Vec<Part>,
    /// Another tcpclose binary, measured beside this one in the churn and stats parts.
    pub baseline: Option<PathBuf>,
}

/// The parts of the bench, each measured once per round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Part {
    /// Churn rate untraced and under each tracer, `kernel.bpf_stats_enabled` off.
    Churn,
    /// Each tracer once more with `kernel.bpf_stats_enabled` on: its kernel programs' run time.
    Stats,
    /// 2 s of full churn on an idle, attached `tcpclose --json`: events lost.
    Burst,
    /// `tcpclose --json` stopped 500 ms under full churn: how fast it drains the backlog.
    Drain,
    /// `tcpclose --json` following 100k open sockets: its memory.
    Rss,
    /// 12,000 hangs coming due at once under churn, spread over 1, 10 and 100 namespaces (and
    /// the churn alone): reports, losses and the reader's delay.
    HungBurst,
}

impl Part {
    const ALL: [Part; 6] = [
        Part::Churn,
        Part::Stats,
        Part::Burst,
        Part::Drain,
        Part::Rss,
        Part::HungBurst,
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Untraced,
    Teardowns,
    Events,
    Tcpstates,
    /// `--baseline PATH --json`.
    Baseline,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Untraced,
        Mode::Teardowns,
        Mode::Baseline,
        Mode::Events,
        Mode::Tcpstates,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Teardowns => "tcpclose --json",
            Mode::Events => "tcpclose --events --json",
            Mode::Tcpstates => "tcpstates (libbpf-tools)",
            Mode::Baseline => "baseline --json",
        }
    }
}

/// One measurement of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    /// Churn under `mode`, statistics off.
    Churn(Mode),
    /// Churn under the tracer `mode`, statistics on.
    Stats(Mode),
    Burst,
    Drain,
    Rss,
    /// Leaks over this many namespaces (0: none) under churn.
    HungBurst(usize),
}

/// Everything the measurements share.
struct Bench {
    tcpclose: PathBuf,
    tcpstates: Option<PathBuf>,
    baseline: Option<PathBuf>,
    /// Where the tracers' output goes.
    dir: TempDir,
    pairs: usize,
    period: Duration,
    parts: Vec<Part>,
}

impl Bench {
    fn modes(&self) -> Vec<Mode> {
        Mode::ALL
            .into_iter()
            .filter(|&m| m != Mode::Tcpstates || self.tcpstates.is_some())
            .filter(|&m| m != Mode::Baseline || self.baseline.is_some())
            .collect()
    }

    fn runs(&self, part: Part) -> bool {
        self.parts.contains(&part)
    }

    /// The measurements of one round, in their order in the first round.
    fn jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        for part in &self.parts {
            match part {
                Part::Churn => jobs.extend(self.modes().into_iter().map(Job::Churn)),
                // Next to the same tracer's churn run, which it is compared with.
                Part::Stats => {
                    for mode in self.modes().into_iter().filter(|&m| m != Mode::Untraced) {
                        let at = jobs
                            .iter()
                            .position(|&j| j == Job::Churn(mode))
                            .map_or(jobs.len(), |i| i + 1);
                        jobs.insert(at, Job::Stats(mode));
                    }
                }
                Part::Burst => jobs.push(Job::Burst),
                Part::Drain => jobs.push(Job::Drain),
                Part::Rss => jobs.push(Job::Rss),
                Part::HungBurst => jobs.extend(hung_burst::SPREADS.map(Job::HungBurst)),
            }
        }
        jobs
    }

    /// The command of the tracer of `mode`, none for untraced.
    fn tracer_command(&self, mode: Mode) -> Option<Command> {
        let (program, args): (&Path, &[&str]) = match mode {
            Mode::Untraced => return None,
            Mode::Teardowns => (&self.tcpclose, &["--json"]),
            Mode::Events => (&self.tcpclose, &["--events", "--json"]),
            Mode::Tcpstates => (self.tcpstates.as_deref()?, &[]),
            Mode::Baseline => (self.baseline.as_deref()?, &["--json"]),
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        Some(cmd)
    }
}

/// One churn measurement.
#[derive(Clone, Debug, Default)]
struct Sample {
    connections_per_s: f64,
    /// CPU time of the churn's threads (client and server, kernel work in their context
    /// included) plus the tracer's, per connection: unlike the rate, hardly moved by whatever
    /// else runs on the machine.
    cpu_ns_per_connection: f64,
    traced: Option<Traced>,
}

/// What one measurement's tracer did.
#[derive(Clone, Debug, Default)]
struct Traced {
    events: u64,
    lost: u64,
    events_per_s: f64,
    /// CPU time of the tracer from the start of the churn to the end of [`DRAIN`].
    cpu_ns: u64,
    cpu_ns_per_event: f64,
    /// Run time of its kernel programs per event delivered: only with statistics on.
    bpf_ns_per_event: Option<f64>,
    wakeups_per_s: f64,
    peak_rss_kib: u64,
    /// Sockets tcpclose dropped from its full table (summary `evicted`).
    evicted: u64,
    /// How far tcpclose fell behind the kernel (from its summary).
    lag: Option<Lag>,
    /// Per kernel program of the tracer: runs per second and ns per run (statistics on).
    programs: BTreeMap<String, (f64, f64)>,
}

/// Everything measured, in order.
#[derive(Default)]
struct Results {
    churn: Vec<(Mode, Sample)>,
    stats: Vec<(Mode, Sample)>,
    burst: Vec<Burst>,
    drain: Vec<Stopped>,
    rss: Vec<Held>,
    hung_burst: Vec<HungBurst>,
}

pub fn bench(tcpclose: &Path, options: &Options) -> Result<()> {
    if options.rounds == 0 || options.pairs == 0 || options.seconds == 0 {
        bail!("--rounds, --pairs and --seconds must be at least 1");
    }
    let mut parts = if options.only.is_empty() {
        Part::ALL.to_vec()
    } else {
        options.only.clone()
    };
    parts.sort_unstable();
    parts.dedup();
    let bench = Bench {
        tcpclose: tcpclose.to_path_buf(),
        tcpstates: tracer::find_tcpstates(),
        baseline: options.baseline.clone(),
        dir: TempDir::create("bench")?,
        pairs: options.pairs,
        period: Duration::from_secs(options.seconds),
        parts,
    };
    install_interrupt_handler();
    let stats = BpfStats::take()?;
    let results = rounds_of(&bench, &stats, options.rounds);
    // Statistics cost a little on every program run: leave the host as it was, also on error.
    stats.restore()?;
    let results = results?;
    report::report(&bench, options, &results);
    Ok(())
}

/// `kernel.bpf_stats_enabled`, off for the bench but while a statistics run needs it, and put
/// back as it was when dropped (or [`BpfStats::restore`]d).
struct BpfStats {
    previous: String,
    restored: bool,
}

impl BpfStats {
    fn take() -> Result<Self> {
        let previous = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS} (run the benchmark as root)"))?;
        let stats = Self {
            previous: previous.trim().to_owned(),
            restored: false,
        };
        stats.set(false)?;
        Ok(stats)
    }

    fn set(&self, on: bool) -> Result<()> {
        fs::write(BPF_STATS, if on { "1" } else { "0" })
            .with_context(|| format!("writing {BPF_STATS}"))
    }

    fn restore(mut self) -> Result<()> {
        self.restored = true;
        fs::write(BPF_STATS, &self.previous)
            .with_context(|| format!("restoring {BPF_STATS} to {}", self.previous))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if !self.restored {
            let _ = fs::write(BPF_STATS, &self.previous);
        }
    }
}

/// Set by SIGINT: the bench stops after the measurement under way (and puts the host back).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn install_interrupt_handler() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe. Children get the
    // default disposition back at exec.
    unsafe { libc::signal(libc::SIGINT, handler as libc::sighandler_t) };
}

fn rounds_of(bench: &Bench, stats: &BpfStats, rounds: usize) -> Result<Results> {
    let jobs = bench.jobs();
    let mut results = Results::default();
    for round in 0..rounds {
        // Rotate the order so that no measurement always runs first (warm caches, thermal
        // drift).
        for i in 0..jobs.len() {
            if INTERRUPTED.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let job = jobs[(i + round) % jobs.len()];
            let line = run_job(bench, stats, job, &mut results)
                .with_context(|| format!("measuring {job:?}"))?;
            eprintln!("round {}: {line}", round + 1);
        }
    }
    Ok(results)
}

/// Runs `job`, keeps its result, and returns a line saying what it found.
fn run_job(bench: &Bench, stats: &BpfStats, job: Job, results: &mut Results) -> Result<String> {
    Ok(match job {
        Job::Churn(mode) => {
            let sample = measure(bench, mode, false)?;
            let line = format!("churn  {}", progress(mode, &sample));
            results.churn.push((mode, sample));
            line
        }
        Job::Stats(mode) => {
            stats.set(true)?;
            let sample = measure(bench, mode, true);
            stats.set(false)?;
            let sample = sample?;
            let line = format!("stats  {}", progress(mode, &sample));
            results.stats.push((mode, sample));
            line
        }
        Job::Burst => {
            let burst = in_fresh_netns(|netns| stress::burst(bench, netns))?;
            let line = format!(
                "burst  {:<26} {} connections, {} events, {} lost",
                Mode::Teardowns.name(),
                burst.connections,
                burst.events,
                burst.lost
            );
            results.burst.push(burst);
            line
        }
        Job::Drain => {
            let stopped = in_fresh_netns(|netns| stress::stop_and_drain(bench, netns))?;
            let lag = stopped.lag.unwrap_or_default();
            let line = format!(
                "drain  {:<26} backlog {} events drained in {:.1} ms ({} events/s), {} lost",
                Mode::Teardowns.name(),
                lag.backlog_events,
                lag.backlog_drain_ns as f64 / 1e6,
                number(lag.drain_per_s()),
                stopped.lost
            );
            results.drain.push(stopped);
            line
        }
        Job::Rss => {
            let held = in_fresh_netns(|netns| stress::hold(bench, netns))?;
            let line = format!(
                "rss    {:<26} {} sockets open (in {:.1} s): VmRSS {:.1} MiB (idle {:.1}), VmHWM \
                 {:.1} MiB, {} events, {} lost, {} evicted",
                Mode::Teardowns.name(),
                held.sockets,
                held.open_s,
                held.rss_kib as f64 / 1024.0,
                held.idle_rss_kib as f64 / 1024.0,
                held.hwm_kib as f64 / 1024.0,
                held.events,
                held.lost,
                held.evicted
            );
            results.rss.push(held);
            line
        }
        Job::HungBurst(namespaces) => {
            let burst = hung_burst::hung_burst(bench, namespaces)?;
            let lag = burst.lag.unwrap_or_default();
            let line = format!(
                "hung   {:<26} {} namespaces: {} of {} hangs reported{}, {} lost, delay p99 {} \
                 max {}",
                Mode::Teardowns.name(),
                burst.namespaces,
                burst.reported,
                burst.hangs,
                burst
                    .all_reported_s
                    .map_or(String::new(), |s| format!(" within {s:.1} s")),
                burst.lost,
                ms(lag.delay_p99_ns as f64),
                ms(lag.delay_max_ns as f64)
            );
            results.hung_burst.push(burst);
            line
        }
    })
}

fn progress(mode: Mode, sample: &Sample) -> String {
    let mut line = format!(
        "{:<26} {:>8.0} conn/s, {:>5.1} CPU us/conn",
        mode.name(),
        sample.connections_per_s,
        sample.cpu_ns_per_connection / 1e3
    );
    if let Some(t) = &sample.traced {
        line += &format!(
            ", {:>8.0} events/s, {} lost, {:.0} CPU ns/event",
            t.events_per_s, t.lost, t.cpu_ns_per_event
        );
        if let Some(bpf) = t.bpf_ns_per_event {
            line += &format!(", {bpf:.0} BPF ns/event");
        }
        if let Some(lag) = t.lag {
            line += &format!(
                ", delay p99 {:.1} ms max {:.1} ms",
                lag.delay_p99_ns as f64 / 1e6,
                lag.delay_max_ns as f64 / 1e6
            );
        }
    }
    line
}

/// Runs `f` in a fresh namespace, deleted after it, then lets the kernel settle.
fn in_fresh_netns<T>(f: impl FnOnce(&Netns) -> Result<T>) -> Result<T> {
    let netns = Netns::create("bench")?;
    let result = f(&netns);
    drop(netns);
    thread::sleep(SETTLE);
    result
}

/// Measures `mode` in a fresh namespace, so that every measurement starts without timewait
/// sockets: one namespace for the whole bench would hold the last minute's, reach
/// `tcp_max_tw_buckets` within seconds, and from then on the kernel would skip TIME_WAIT (and
/// the timer programs' work) for most connections. `stats`: whether
/// `kernel.bpf_stats_enabled` is on, so that the programs' run time can be read.
fn measure(bench: &Bench, mode: Mode, stats: bool) -> Result<Sample> {
    in_fresh_netns(|netns| measure_in(bench, mode, netns, stats))
}

fn measure_in(bench: &Bench, mode: Mode, netns: &Netns, stats: bool) -> Result<Sample> {
    let mut tracer = match bench.tracer_command(mode) {
        Some(cmd) => Some(Tracer::start(cmd, mode, &bench.dir.0)?),
        None => None,
    };
    let before = tracer.as_ref().map(Tracer::usage).transpose()?;
    let started = Instant::now();
    let churned = churn::timed(netns, bench.pairs, bench.period)?;
    let elapsed = started.elapsed().as_secs_f64();
    let traced = match (tracer.as_mut(), before) {
        (Some(tracer), Some(before)) => Some(finish(tracer, &before, elapsed, stats)?),
        _ => None,
    };
    let tracer_cpu_ns = traced.as_ref().map_or(0, |t| t.cpu_ns);
    Ok(Sample {
        connections_per_s: churned.connections as f64 / elapsed,
        cpu_ns_per_connection: (churned.cpu_ns + tracer_cpu_ns) as f64
            / churned.connections.max(1) as f64,
        traced,
    })
}

/// After `elapsed` s of churn: gives the tracer time to drain, reads what it used since
/// `before`, and stops it.
fn finish(
    tracer: &mut Tracer,
    before: &tracer::Usage,
    elapsed: f64,
    stats: bool,
) -> Result<Traced> {
    let programs_after = program_runs(&tracer.programs)?;
    thread::sleep(DRAIN);
    let process_after = process_usage(tracer.pid())?;
    let peak_rss_kib = status_field(&read_proc(tracer.pid(), "status")?, "VmHWM:").unwrap_or(0);
    let delivered = tracer.stop()?;

    let events = delivered.events.max(1) as f64;
    let cpu_ns = process_after.cpu_ns.saturating_sub(before.process.cpu_ns);
    let switches = process_after
        .voluntary_switches
        .saturating_sub(before.process.voluntary_switches);
    let mut traced = Traced {
        events: delivered.events,
        lost: delivered.lost,
        evicted: delivered.evicted,
        lag: delivered.lag,
        events_per_s: delivered.events as f64 / elapsed,
        cpu_ns,
        cpu_ns_per_event: cpu_ns as f64 / events,
        wakeups_per_s: switches as f64 / (elapsed + DRAIN.as_secs_f64()),
        peak_rss_kib,
        ..Traced::default()
    };
    if stats {
        let mut bpf_ns = 0;
        for (name, runs, ns) in runs_between(&before.programs, &programs_after) {
            bpf_ns += ns;
            let ns_per_run = ns as f64 / runs.max(1) as f64;
            traced
                .programs
                .insert(name, (runs as f64 / elapsed, ns_per_run));
        }
        traced.bpf_ns_per_event = Some(bpf_ns as f64 / events);
    }
    Ok(traced)
}
