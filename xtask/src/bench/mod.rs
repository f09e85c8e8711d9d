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

use std::{
    collections::BTreeMap,
    env,
    fs::{self, File},
    io::{self, Read as _, Seek as _, SeekFrom},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{self, Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

mod hung_burst;

use hung_burst::HungBurst;
use serde_json::Value;
use tcpclose_common::{
    DEFAULT_RING_BYTES, TIMER_PROGRAMS, TRANSITION_EVENT_SIZE, TRANSITION_PROGRAM,
};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The kernel keeps the first 15 characters of a program's name (BPF_OBJ_NAME_LEN).
const NAME_LEN: usize = 15;
/// Where Debian's libbpf-tools puts `tcpstates` (`/usr/sbin` is not on every user's PATH).
const TCPSTATES_PATHS: [&str; 2] = ["/usr/sbin/tcpstates", "/usr/bin/tcpstates"];
/// libbpf-tools' tcpstates program on `sock:inet_sock_set_state`.
const TCPSTATES_PROGRAM: &str = "handle_set_state";
/// How long a tracer may take to attach before the bench gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a tracer may take to exit after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// After the churn, the time the tracer gets to drain what the kernel already handed it, so that
/// its CPU time covers the events it delivers.
const DRAIN: Duration = Duration::from_millis(300);
/// After a measurement's namespace is deleted, the time the kernel gets to tear it down (and its
/// timewait sockets) before the next measurement starts.
const SETTLE: Duration = Duration::from_millis(500);
/// Loopback addresses the clients rotate over, so that 4-tuples are not reused too soon.
const CLIENT_ADDRS: u8 = 64;

/// Burst: how long the freshly attached tracer idles before the churn starts, and how long the
/// churn lasts.
const BURST_IDLE: Duration = Duration::from_secs(1);
const BURST: Duration = Duration::from_secs(2);
/// Backlog drain: churn before the tracer is stopped, how long it stays stopped, churn after.
const DRAIN_LEAD: Duration = Duration::from_secs(1);
const DRAIN_STOP: Duration = Duration::from_millis(500);
const DRAIN_TAIL: Duration = Duration::from_millis(1500);
/// RSS: connections held open at once (each is two sockets), the listener ports and the
/// destination addresses they spread over (32 destinations: ephemeral ports suffice), and how
/// long the tracer gets to see them all before its memory is read.
const HELD_CONNECTIONS: usize = 50_000;
const HOLD_PORTS: usize = 4;
const HOLD_ADDRS: u8 = 8;
const HOLD_SEEN: Duration = Duration::from_secs(2);
/// Accept queue of the RSS listeners (the kernel caps it at `net.core.somaxconn`).
const HOLD_BACKLOG: i32 = 4096;

/// Targets the stress figures are held to.
const TARGET_DRAIN_PER_S: f64 = 2.5e6;
const TARGET_DELAY_P99_NS: f64 = 100e6;
/// The reader's longest delay while thousands of hangs come due.
const TARGET_HUNG_DELAY_MAX_NS: f64 = 250e6;
const TARGET_RSS_MIB: f64 = 64.0;

/// What `cargo xtask bench` was asked for.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub pairs: usize,
    /// The parts to run (all when empty).
    pub only: Vec<Part>,
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
}

impl Mode {
    const ALL: [Mode; 4] = [
        Mode::Untraced,
        Mode::Teardowns,
        Mode::Events,
        Mode::Tcpstates,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Teardowns => "tcpclose --json",
            Mode::Events => "tcpclose --events --json",
            Mode::Tcpstates => "tcpstates (libbpf-tools)",
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

/// tcpclose's own account of how far it fell behind the kernel (summary `delay_*_ns`,
/// `largest_backlog_*`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Lag {
    pub(crate) delay_p50_ns: u64,
    pub(crate) delay_p99_ns: u64,
    pub(crate) delay_max_ns: u64,
    pub(crate) backlog_events: u64,
    pub(crate) backlog_drain_ns: u64,
}

impl Lag {
    /// Events per second it drained its largest backlog at.
    pub(crate) fn drain_per_s(&self) -> Option<f64> {
        (self.backlog_drain_ns > 0)
            .then(|| self.backlog_events as f64 * 1e9 / self.backlog_drain_ns as f64)
    }
}

/// A burst of churn on an idle tracer.
#[derive(Clone, Debug, Default)]
struct Burst {
    connections: u64,
    events: u64,
    lost: u64,
    lag: Option<Lag>,
}

/// The tracer stopped under churn, then let go.
#[derive(Clone, Debug, Default)]
struct Stopped {
    events: u64,
    lost: u64,
    lag: Option<Lag>,
}

/// The tracer following many open sockets.
#[derive(Clone, Debug, Default)]
struct Held {
    /// Sockets open in the namespace (both ends of each connection).
    sockets: u64,
    /// Seconds it took to open them.
    open_s: f64,
    idle_rss_kib: u64,
    rss_kib: u64,
    hwm_kib: u64,
    /// Events the tracer delivered and lost meanwhile; sockets it evicted.
    events: u64,
    lost: u64,
    evicted: u64,
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
        tcpstates: find_tcpstates(),
        dir: TempDir::create()?,
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
    report(&bench, options, &results);
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
            let burst = in_fresh_netns(|netns| burst(bench, netns))?;
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
            let stopped = in_fresh_netns(|netns| stop_and_drain(bench, netns))?;
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
            let held = in_fresh_netns(|netns| hold(bench, netns))?;
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
    let netns = Netns::create()?;
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
    let churned = churn(netns, bench.pairs, bench.period)?;
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
fn finish(tracer: &mut Tracer, before: &Usage, elapsed: f64, stats: bool) -> Result<Traced> {
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

// ---------------------------------------------------------------------------------------------
// Stress: burst, backlog drain, many open sockets

/// Starts `tcpclose --json`, lets it idle, churns [`BURST`] at full speed, and reads what it
/// lost.
fn burst(bench: &Bench, netns: &Netns) -> Result<Burst> {
    let mut tracer = start_tcpclose(bench)?;
    thread::sleep(BURST_IDLE);
    let churned = churn(netns, bench.pairs, BURST)?;
    thread::sleep(DRAIN);
    let delivered = tracer.stop()?;
    Ok(Burst {
        connections: churned.connections,
        events: delivered.events,
        lost: delivered.lost,
        lag: delivered.lag,
    })
}

fn start_tcpclose(bench: &Bench) -> Result<Tracer> {
    let mode = Mode::Teardowns;
    let cmd = bench
        .tracer_command(mode)
        .context("tcpclose has a command")?;
    Tracer::start(cmd, mode, &bench.dir.0)
}

/// Under full churn, stops `tcpclose --json` (SIGSTOP) for [`DRAIN_STOP`], lets it go on
/// (SIGCONT), and reads from its summary how fast it caught up.
fn stop_and_drain(bench: &Bench, netns: &Netns) -> Result<Stopped> {
    let mut tracer = start_tcpclose(bench)?;
    let pid = i32::try_from(tracer.pid()).context("pid out of range")?;
    thread::scope(|scope| -> Result<()> {
        let churn = scope.spawn(|| churn(netns, bench.pairs, DRAIN_LEAD + DRAIN_STOP + DRAIN_TAIL));
        thread::sleep(DRAIN_LEAD);
        // Not in the middle of a catch-up (whose time would then include the stop).
        wait_asleep(tracer.pid());
        {
            let _stopped = Sigstopped::stop(pid)?;
            thread::sleep(DRAIN_STOP);
        }
        churn.join().map_err(|_| anyhow!("the churn panicked"))??;
        Ok(())
    })?;
    thread::sleep(DRAIN);
    let delivered = tracer.stop()?;
    if delivered.lag.is_none() {
        bail!("tcpclose's summary has no delay_*_ns / largest_backlog_* (an older binary?)");
    }
    Ok(Stopped {
        events: delivered.events,
        lost: delivered.lost,
        lag: delivered.lag,
    })
}

/// Waits (at most 200 ms) until the main thread of `pid`, tcpclose's event loop, is asleep
/// (state `S`): waiting for the ring buffer or its timer, not draining a backlog. A drain that
/// returns a full batch is followed by another without sleeping.
fn wait_asleep(pid: u32) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(200) {
        let asleep = fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().next().map(|state| state == "S")
            })
            .unwrap_or(false);
        if asleep {
            return;
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// A process stopped by SIGSTOP, continued (SIGCONT) when dropped.
struct Sigstopped(i32);

impl Sigstopped {
    fn stop(pid: i32) -> Result<Self> {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            return Err(io::Error::last_os_error()).context("SIGSTOP to the tracer");
        }
        Ok(Self(pid))
    }
}

impl Drop for Sigstopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Starts `tcpclose --json`, opens [`HELD_CONNECTIONS`] loopback connections in `netns` and
/// holds them, gives the tracer [`HOLD_SEEN`] to see them all, reads its memory, stops it, and
/// resets the connections (no timewait sockets left behind). The sockets are spread over
/// helper processes (`cargo xtask hold-connections`): a process may not hold more than
/// RLIMIT_NOFILE's hard limit, which root cannot raise without CAP_SYS_RESOURCE.
fn hold(bench: &Bench, netns: &Netns) -> Result<Held> {
    let mut tracer = start_tcpclose(bench)?;
    let pid = tracer.pid();
    let idle_rss_kib = status_field(&read_proc(pid, "status")?, "VmRSS:").unwrap_or(0);
    let per_process = connections_per_process()?;
    let processes = HELD_CONNECTIONS.div_ceil(per_process);
    let started = Instant::now();
    let mut holders = (0..processes)
        .map(|i| {
            let count =
                HELD_CONNECTIONS / processes + usize::from(i < HELD_CONNECTIONS % processes);
            Holder::spawn(netns, count)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sockets = 0;
    for holder in &mut holders {
        sockets += 2 * holder.wait_ready()? as u64;
    }
    let open_s = started.elapsed().as_secs_f64();
    thread::sleep(HOLD_SEEN);
    let status = read_proc(pid, "status")?;
    let (rss_kib, hwm_kib) = (
        status_field(&status, "VmRSS:").unwrap_or(0),
        status_field(&status, "VmHWM:").unwrap_or(0),
    );
    // The tracer stops before the connections close: what it reports covers their opening.
    let delivered = tracer.stop();
    drop(holders);
    let delivered = delivered?;
    Ok(Held {
        sockets,
        open_s,
        idle_rss_kib,
        rss_kib,
        hwm_kib,
        events: delivered.events,
        lost: delivered.lost,
        evicted: delivered.evicted,
    })
}

/// Connections one helper process can hold: both ends of each, within its file limit.
fn connections_per_process() -> Result<usize> {
    let hard = usize::try_from(fd_limit()?.rlim_max).unwrap_or(usize::MAX);
    let per_process = hard.saturating_sub(64).min(1 << 20) / 2;
    if per_process < 1000 {
        bail!("RLIMIT_NOFILE's hard limit ({hard}) is too low to hold connections");
    }
    Ok(per_process)
}

/// A helper process holding connections (`cargo xtask hold-connections`); when dropped, it is
/// told to reset them and waited for.
struct Holder {
    child: Child,
    stdout: io::BufReader<process::ChildStdout>,
}

impl Holder {
    fn spawn(netns: &Netns, count: usize) -> Result<Self> {
        Self::spawn_with(netns, count, false)
    }

    /// A holder whose connections leak: see [`hold_connections`].
    fn spawn_leaking(netns: &Netns, count: usize) -> Result<Self> {
        Self::spawn_with(netns, count, true)
    }

    fn spawn_with(netns: &Netns, count: usize, leak: bool) -> Result<Self> {
        let exe = env::current_exe().context("finding the xtask binary")?;
        let mut child = Command::new(&exe)
            .args(["hold-connections", &netns.name, &count.to_string()])
            .args(leak.then_some("--leak"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} hold-connections", exe.display()))?;
        let stdout = child.stdout.take().context("the holder's stdout")?;
        Ok(Self {
            child,
            stdout: io::BufReader::new(stdout),
        })
    }

    /// Waits until it holds its connections; returns how many.
    fn wait_ready(&mut self) -> Result<usize> {
        use io::BufRead as _;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .strip_prefix("ready ")
            .and_then(|n| n.parse().ok())
            .context("a connection holder failed (see its error above)")
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // EOF on its stdin: reset the connections and exit.
        drop(self.child.stdin.take());
        let started = Instant::now();
        while let Ok(None) = self.child.try_wait() {
            if started.elapsed() > STOP_TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `cargo xtask hold-connections NETNS COUNT [--leak]` (the bench's helper): in the namespace
/// `netns`, opens `count` connections to listeners of its own and accepts them, says `ready
/// COUNT` on stdout, holds them until stdin ends, then resets them. With `leak`, the servers
/// never close and the clients leave them in CLOSE_WAIT before it says ready: half close (an
/// orphaned FIN_WAIT2), half shut their sending side down (FIN_WAIT2 held open).
pub fn hold_connections(netns: &str, count: usize, leak: bool) -> Result<()> {
    use io::{BufRead as _, Write as _};
    let hard = fd_limit()?.rlim_max;
    raise_fd_limit(hard)?;
    enter_netns(netns)?;
    let mut sockets = open_connections(count)?;
    if leak {
        // The servers come first, then the clients.
        let clients = sockets.split_off(count);
        for (i, client) in clients.into_iter().enumerate() {
            if i % 2 == 0 {
                drop(client);
            } else {
                client
                    .shutdown(std::net::Shutdown::Write)
                    .context("shutdown(SHUT_WR)")?;
                sockets.push(client);
            }
        }
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready {count}")?;
    stdout.flush()?;
    let _ = io::stdin().lock().read_line(&mut String::new());
    for socket in &sockets {
        reset_on_close(socket);
    }
    Ok(())
}

/// Opens `n` connections to listeners on [`HOLD_PORTS`] ports at [`HOLD_ADDRS`] loopback
/// addresses of the calling thread's namespace; returns both ends of each.
fn open_connections(n: usize) -> Result<Vec<TcpStream>> {
    let listeners = (0..HOLD_PORTS)
        .map(|_| -> Result<TcpListener> {
            let listener = TcpListener::bind("0.0.0.0:0").context("binding a listener")?;
            // std listens with a backlog of 128: a deeper accept queue lets the connects run
            // ahead of the accepts. Listening again changes it.
            // SAFETY: listen(2) on a socket we own.
            if unsafe { libc::listen(listener.as_raw_fd(), HOLD_BACKLOG) } != 0 {
                return Err(io::Error::last_os_error()).context("listen");
            }
            Ok(listener)
        })
        .collect::<Result<Vec<_>>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<_>>()?;
    let per_listener: Vec<usize> = (0..HOLD_PORTS)
        .map(|i| n / HOLD_PORTS + usize::from(i < n % HOLD_PORTS))
        .collect();
    let accepted = Mutex::new(Vec::with_capacity(n));
    let clients = thread::scope(|scope| -> Result<Vec<TcpStream>> {
        let acceptors: Vec<_> = listeners
            .iter()
            .zip(&per_listener)
            .map(|(listener, &count)| {
                let accepted = &accepted;
                scope.spawn(move || -> Result<()> {
                    let mut mine = Vec::with_capacity(count);
                    while mine.len() < count {
                        let (stream, _) = listener.accept().context("accepting")?;
                        mine.push(stream);
                    }
                    accepted
                        .lock()
                        .map_err(|_| anyhow!("poisoned"))?
                        .extend(mine);
                    Ok(())
                })
            })
            .collect();
        let mut clients = Vec::with_capacity(n);
        let mut failure = None;
        for i in 0..n {
            let addr = SocketAddr::from((
                [
                    127,
                    0,
                    0,
                    1 + (i / HOLD_PORTS % usize::from(HOLD_ADDRS)) as u8,
                ],
                ports[i % HOLD_PORTS],
            ));
            match TcpStream::connect(addr) {
                Ok(stream) => clients.push(stream),
                Err(err) => {
                    failure = Some(anyhow::Error::new(err).context(format!(
                        "connection {} of {n} to {addr} (file descriptors, ephemeral ports?)",
                        i + 1
                    )));
                    break;
                }
            }
        }
        if let Some(err) = failure {
            // Unblock the acceptors, which wait for connections that will not come: accept()
            // on a listener shut down fails (EINVAL).
            for listener in &listeners {
                // SAFETY: shutdown(2) on a socket we own.
                unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
            }
            for acceptor in acceptors {
                let _ = acceptor.join();
            }
            return Err(err);
        }
        for acceptor in acceptors {
            acceptor
                .join()
                .map_err(|_| anyhow!("an acceptor panicked"))??;
        }
        Ok(clients)
    })?;
    let mut all = accepted.into_inner().map_err(|_| anyhow!("poisoned"))?;
    all.extend(clients);
    Ok(all)
}

/// SO_LINGER 0: closing sends an RST and leaves no timewait socket.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket we own, with a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn fd_limit() -> Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(limit)
}

/// Raises RLIMIT_NOFILE's soft limit to `n` (at most the hard limit).
fn raise_fd_limit(n: u64) -> Result<()> {
    let mut limit = fd_limit()?;
    if limit.rlim_cur >= n {
        return Ok(());
    }
    limit.rlim_cur = n.min(limit.rlim_max);
    // SAFETY: setrlimit(2) reads one rlimit that we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The churn

/// What the churn did.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Churned {
    pub(crate) connections: u64,
    /// CPU time of its threads.
    cpu_ns: u64,
}

impl std::ops::Add for Churned {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            connections: self.connections + other.connections,
            cpu_ns: self.cpu_ns + other.cpu_ns,
        }
    }
}

/// Runs `pairs` client/server pairs in `netns` for `period`.
pub(crate) fn churn(netns: &Netns, pairs: usize, period: Duration) -> Result<Churned> {
    let deadline = Instant::now() + period;
    thread::scope(|scope| {
        let handles: Vec<_> = (0..pairs)
            .map(|_| scope.spawn(|| pair(netns, deadline)))
            .collect();
        let mut total = Churned::default();
        for handle in handles {
            total = total
                + handle
                    .join()
                    .map_err(|_| anyhow!("a churn thread panicked"))??;
        }
        Ok(total)
    })
}

/// One client/server pair, each on its own thread inside `netns`: the client connects as fast as
/// it can until `deadline` while the server accepts and closes at once. The server closes first,
/// so its side goes through FIN_WAIT and TIME_WAIT on a timewait socket (the timer programs'
/// work) and the client, which closes on EOF, through CLOSE_WAIT and LAST_ACK. Had the clients
/// closed first, their ephemeral ports, held 60 s in TIME_WAIT, would slow every connect() down
/// as they run out.
fn pair(netns: &Netns, deadline: Instant) -> Result<Churned> {
    netns.enter()?;
    let listener = TcpListener::bind("0.0.0.0:0").context("binding a churn listener")?;
    let port = listener.local_addr()?.port();
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let server = scope.spawn(|| serve(netns, &listener, &done));
        let cpu_before = thread_cpu_ns()?;
        let connections = connect_until(port, deadline);
        let client_cpu_ns = thread_cpu_ns()?.saturating_sub(cpu_before);
        done.store(true, Ordering::Relaxed);
        // Unblock the server's accept().
        let _ = TcpStream::connect(("127.0.0.1", port));
        let server_cpu_ns = server
            .join()
            .map_err(|_| anyhow!("a churn server panicked"))??;
        Ok(Churned {
            connections,
            cpu_ns: client_cpu_ns + server_cpu_ns,
        })
    })
}

/// Accepts and closes at once until `done`; returns the CPU time it took.
fn serve(netns: &Netns, listener: &TcpListener, done: &AtomicBool) -> Result<u64> {
    netns.enter()?;
    let cpu_before = thread_cpu_ns()?;
    while !done.load(Ordering::Relaxed) {
        let _ = listener.accept();
    }
    Ok(thread_cpu_ns()?.saturating_sub(cpu_before))
}

/// CPU time of the calling thread so far (CLOCK_THREAD_CPUTIME_ID), in ns.
fn thread_cpu_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec that we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Err(io::Error::last_os_error()).context("clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    }
    let secs = u64::try_from(ts.tv_sec).context("negative thread CPU time")?;
    let nanos = u64::try_from(ts.tv_nsec).context("negative thread CPU time")?;
    Ok(secs * 1_000_000_000 + nanos)
}

fn connect_until(port: u16, deadline: Instant) -> u64 {
    let addrs: Vec<SocketAddr> = (1..=CLIENT_ADDRS)
        .map(|i| SocketAddr::from(([127, 0, 0, i], port)))
        .collect();
    let mut made = 0;
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect(addrs[made as usize % addrs.len()]) {
            // Wait for the server's FIN before closing.
            let _ = stream.read(&mut [0; 1]);
            made += 1;
        }
    }
    made
}

/// A network namespace of the bench's own (`ip netns add`, loopback up), deleted when dropped.
pub(crate) struct Netns {
    name: String,
}

impl Netns {
    pub(crate) fn create() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tcpclose-bench-{}-{}",
            process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let netns = Self { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// Moves the calling thread into the namespace: sockets it makes from now on belong to it.
    fn enter(&self) -> Result<()> {
        enter_netns(&self.name)
    }
}

/// Moves the calling thread into the network namespace `name` (`ip netns`).
fn enter_netns(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns(2) on a namespace fd that stays open for the call; affects only this
    // thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(err) = ip(&["netns", "del", &self.name]) {
            eprintln!("bench: {err:#}");
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .status()
        .context("running `ip` (install iproute2)")?;
    if !status.success() {
        bail!("ip {} failed: {status}", args.join(" "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The tracer

/// A tracer running in the host namespace, its standard output and error going to files.
pub(crate) struct Tracer {
    child: Child,
    mode: Mode,
    pub(crate) stdout: PathBuf,
    pub(crate) stderr: PathBuf,
    /// Ids of the kernel programs it holds.
    programs: Vec<u32>,
}

/// What a tracer's process and programs used up to some moment.
struct Usage {
    process: ProcessUsage,
    programs: BTreeMap<u32, ProgramRuns>,
}

/// What a tracer says it delivered.
pub(crate) struct Delivered {
    pub(crate) events: u64,
    pub(crate) lost: u64,
    evicted: u64,
    /// tcpclose's account of how far it fell behind (none from tcpstates, or from a tcpclose
    /// that predates it).
    pub(crate) lag: Option<Lag>,
}

impl Tracer {
    pub(crate) fn start(mut cmd: Command, mode: Mode, dir: &Path) -> Result<Self> {
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).context("creating the tracer's output file")?)
            .stderr(File::create(&stderr).context("creating the tracer's error file")?);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let mut tracer = Self {
            child,
            mode,
            stdout,
            stderr,
            programs: Vec::new(),
        };
        tracer.wait_ready()?;
        tracer.programs = program_ids(tracer.pid())?;
        Ok(tracer)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        while !self.is_ready() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} ended before it was ready ({status}): {}",
                    self.mode.name(),
                    fs::read_to_string(&self.stderr).unwrap_or_default().trim()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("{} not ready after {START_TIMEOUT:?}", self.mode.name());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// tcpclose says so on stderr once attached; tcpstates catches SIGINT once its programs are
    /// attached and its perf buffer is open, and says nothing (its header sits in stdio's buffer).
    fn is_ready(&self) -> bool {
        match self.mode {
            Mode::Tcpstates => read_proc(self.pid(), "status")
                .ok()
                .and_then(|status| hex_field(&status, "SigCgt:"))
                .is_some_and(|caught| caught & (1 << (libc::SIGINT - 1)) != 0),
            _ => fs::read_to_string(&self.stderr)
                .is_ok_and(|s| s.lines().any(|line| line.starts_with("Tracing"))),
        }
    }

    fn usage(&self) -> Result<Usage> {
        Ok(Usage {
            process: process_usage(self.pid())?,
            programs: program_runs(&self.programs)?,
        })
    }

    /// Interrupts it as Ctrl-C would, waits for it, and reads what it delivered.
    pub(crate) fn stop(&mut self) -> Result<Delivered> {
        let pid = i32::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if started.elapsed() > STOP_TIMEOUT {
                bail!(
                    "{} still running {STOP_TIMEOUT:?} after SIGINT",
                    self.mode.name()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!(
                "{} ended with {status}: {}",
                self.mode.name(),
                fs::read_to_string(&self.stderr).unwrap_or_default().trim()
            );
        }
        match self.mode {
            Mode::Tcpstates => tcpstates_delivered(&self.stdout, &self.stderr),
            _ => tcpclose_delivered(&self.stdout),
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Only when a measurement failed half-way is the tracer still running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
    }
}

/// From tcpclose's `summary` record, the last line of its JSON output.
fn tcpclose_delivered(stdout: &Path) -> Result<Delivered> {
    let tail = read_tail(stdout, 64 * 1024)?;
    let line = tail
        .lines()
        .rev()
        .find(|line| line.contains(r#""type":"summary""#))
        .context("tcpclose printed no summary record")?;
    let summary: Value = serde_json::from_str(line).context("parsing tcpclose's summary")?;
    let field = |name: &str| {
        summary
            .get(name)
            .and_then(Value::as_u64)
            .with_context(|| format!("no {name} in tcpclose's summary"))
    };
    Ok(Delivered {
        events: field("transitions")?,
        lost: field("lost")? + field("timewait_lost")?,
        evicted: field("evicted")?,
        lag: lag_of(&summary),
    })
}

/// The delay and backlog figures of a tcpclose summary, when it has them all.
pub(crate) fn lag_of(summary: &Value) -> Option<Lag> {
    let field = |name: &str| summary.get(name).and_then(Value::as_u64);
    Some(Lag {
        delay_p50_ns: field("delay_p50_ns")?,
        delay_p99_ns: field("delay_p99_ns")?,
        delay_max_ns: field("delay_max_ns")?,
        backlog_events: field("largest_backlog_events")?,
        backlog_drain_ns: field("largest_backlog_drain_ns")?,
    })
}

/// tcpstates prints a header, then one line per state change; it reports each loss on stderr as
/// `lost N events on CPU #C`.
fn tcpstates_delivered(stdout: &Path, stderr: &Path) -> Result<Delivered> {
    let events = count_lines(stdout)?.saturating_sub(1);
    let lost = fs::read_to_string(stderr)
        .context("reading tcpstates' errors")?
        .lines()
        .filter_map(|line| {
            line.strip_prefix("lost ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    Ok(Delivered {
        events,
        lost,
        evicted: 0,
        lag: None,
    })
}

fn find_tcpstates() -> Option<PathBuf> {
    let on_path: Vec<PathBuf> = env::var_os("PATH")
        .map(|path| {
            env::split_paths(&path)
                .map(|dir| dir.join("tcpstates"))
                .collect()
        })
        .unwrap_or_default();
    TCPSTATES_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|path| path.is_file())
}

// ---------------------------------------------------------------------------------------------
// What the kernel says about the tracer

/// What a process used so far.
struct ProcessUsage {
    /// utime + stime of all its threads, in ns (clock-tick resolution).
    cpu_ns: u64,
    /// Voluntary context switches of its live threads: each is a sleep, so the count is a proxy
    /// for its wakeups.
    voluntary_switches: u64,
}

fn process_usage(pid: u32) -> Result<ProcessUsage> {
    Ok(ProcessUsage {
        cpu_ns: cpu_ns(pid)?,
        voluntary_switches: voluntary_switches(pid)?,
    })
}

fn cpu_ns(pid: u32) -> Result<u64> {
    let stat = read_proc(pid, "stat")?;
    // Fields after the command name, which may hold spaces and parentheses: state is field 3,
    // utime and stime fields 14 and 15.
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("parsing /proc/PID/stat")?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("parsing utime/stime in /proc/PID/stat")
    };
    let ticks = ticks(14 - 3)? + ticks(15 - 3)?;
    Ok(ticks * (1_000_000_000 / clock_ticks_per_s()))
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

fn voluntary_switches(pid: u32) -> Result<u64> {
    let tasks =
        fs::read_dir(format!("/proc/{pid}/task")).context("listing the tracer's threads")?;
    let mut total = 0;
    for task in tasks.flatten() {
        // A thread may end between listing and reading.
        if let Ok(status) = fs::read_to_string(task.path().join("status")) {
            total += status_field(&status, "voluntary_ctxt_switches:").unwrap_or(0);
        }
    }
    Ok(total)
}

/// The kernel programs a process holds: `prog_id` in the fdinfo of its program and link fds.
fn program_ids(pid: u32) -> Result<Vec<u32>> {
    let fds = fs::read_dir(format!("/proc/{pid}/fdinfo")).context("listing the tracer's fds")?;
    let mut ids: Vec<u32> = fds
        .flatten()
        .filter_map(|fd| fs::read_to_string(fd.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|line| line.strip_prefix("prog_id:")?.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        bail!("the tracer (pid {pid}) holds no BPF program");
    }
    Ok(ids)
}

/// A program's name (as the kernel keeps it), run count and run time (ns) so far.
struct ProgramRuns {
    name: String,
    runs: u64,
    ns: u64,
}

fn program_runs(ids: &[u32]) -> Result<BTreeMap<u32, ProgramRuns>> {
    let mut runs = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        if !ids.contains(&info.id()) {
            continue;
        }
        let name = info.name_as_str().unwrap_or("?").to_owned();
        let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        runs.insert(
            info.id(),
            ProgramRuns {
                name,
                runs: info.run_count(),
                ns,
            },
        );
    }
    Ok(runs)
}

/// `(full name, runs, ns)` per program between two readings.
fn runs_between(
    before: &BTreeMap<u32, ProgramRuns>,
    after: &BTreeMap<u32, ProgramRuns>,
) -> Vec<(String, u64, u64)> {
    after
        .iter()
        .map(|(id, a)| {
            let (runs0, ns0) = before.get(id).map_or((0, 0), |b| (b.runs, b.ns));
            (
                full_name(&a.name),
                a.runs.saturating_sub(runs0),
                a.ns.saturating_sub(ns0),
            )
        })
        .collect()
}

/// The full name of a program whose name the kernel cut at [`NAME_LEN`], when it is one of
/// tcpclose's or tcpstates'.
fn full_name(kernel_name: &str) -> String {
    [TRANSITION_PROGRAM, TCPSTATES_PROGRAM]
        .into_iter()
        .chain(TIMER_PROGRAMS.iter().map(|(name, _)| *name))
        .find(|name| kernel_name.len() == NAME_LEN && name.starts_with(kernel_name))
        .unwrap_or(kernel_name)
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Files

pub(crate) fn read_proc(pid: u32, file: &str) -> Result<String> {
    let path = format!("/proc/{pid}/{file}");
    fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}

/// `KEY   N ...` in a /proc status file.
pub(crate) fn status_field(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find_map(|line| line.strip_prefix(key))?;
    line.split_whitespace().next()?.parse().ok()
}

fn hex_field(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find_map(|line| line.strip_prefix(key))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// The last `bytes` of a file, as text.
pub(crate) fn read_tail(path: &Path, bytes: u64) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)?;
    Ok(String::from_utf8_lossy(&tail).into_owned())
}

fn count_lines(path: &Path) -> Result<u64> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0; 1 << 16];
    let mut lines = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(lines);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

/// A directory of the bench's own under the temporary directory, removed when dropped.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn create() -> Result<Self> {
        let path = env::temp_dir().join(format!("tcpclose-bench-{}", process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The report

fn report(bench: &Bench, options: &Options, results: &Results) {
    println!();
    println!("{}", machine_facts(bench, options));
    if bench.runs(Part::Churn) {
        println!();
        println!("Churn, kernel.bpf_stats_enabled=0:");
        println!();
        print_main_table(bench, results);
    }
    if bench.runs(Part::Stats) {
        println!();
        println!("Kernel programs, separate runs with kernel.bpf_stats_enabled=1:");
        println!();
        print_stats_table(bench, results);
        println!();
        print_program_table(bench, &results.stats);
    }
    let stress = stress_rows(bench, results);
    if !stress.is_empty() {
        println!();
        println!("tcpclose under stress (default ring buffer), medians of the rounds:");
        println!();
        print_stress_table(&stress);
    }
    println!();
    print_notes(bench, results);
}

fn machine_facts(bench: &Bench, options: &Options) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cores = thread::available_parallelism().map_or(0, usize::from);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let parts: Vec<&str> = bench
        .parts
        .iter()
        .map(|p| match p {
            Part::Churn => "churn",
            Part::Stats => "stats",
            Part::Burst => "burst",
            Part::Drain => "drain",
            Part::Rss => "rss",
            Part::HungBurst => "hung-burst",
        })
        .collect();
    format!(
        "Linux {kernel}, {cores} cores ({cpu}). Loopback churn: {} client/server pairs (threads) \
         in a network namespace of their own (fresh per run), server closes first; {} \
         interleaved rounds of {} s ({}); medians. Tracers in the host namespace, output to a \
         file.",
        bench.pairs,
        options.rounds,
        options.seconds,
        parts.join(", "),
    )
}

fn print_main_table(bench: &Bench, results: &Results) {
    let samples = &results.churn;
    let rate = |s: &Sample| Some(s.connections_per_s);
    let cpu = |s: &Sample| Some(s.cpu_ns_per_connection / 1e3);
    let (base_rate, base_cpu) = (
        median_of(samples, Mode::Untraced, rate),
        median_of(samples, Mode::Untraced, cpu),
    );
    println!(
        "| mode | conn/s (min-max) | vs untraced | CPU us/conn | vs untraced | events/s | lost \
         (all runs) | tracer CPU ns/event | BPF ns/event (bpf_stats runs) | wakeups/s | peak RSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mode in Mode::ALL {
        if mode == Mode::Tcpstates && bench.tcpstates.is_none() {
            println!(
                "| {} | not installed (`apt-get install libbpf-tools`) | | | | | | | | | |",
                mode.name()
            );
            continue;
        }
        let (mode_rate, mode_cpu) = (
            median_of(samples, mode, rate),
            median_of(samples, mode, cpu),
        );
        let traced = |f: fn(&Traced) -> f64| median_of(samples, mode, |s| s.traced.as_ref().map(f));
        let bpf = median_of(&results.stats, mode, |s| {
            s.traced.as_ref()?.bpf_ns_per_event
        });
        println!(
            "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.name(),
            number(mode_rate),
            spread(samples, mode, rate),
            ratio(mode_rate, base_rate),
            mode_cpu.map_or("-".into(), |us| format!("{us:.2}")),
            ratio(mode_cpu, base_cpu),
            number(traced(|t| t.events_per_s)),
            lost(samples, mode),
            number(traced(|t| t.cpu_ns_per_event)),
            number(bpf),
            number(traced(|t| t.wakeups_per_s)),
            traced(|t| t.peak_rss_kib as f64).map_or("-".into(), mib),
        );
    }
}

/// The statistics runs: their churn rate against the same tracer's with statistics off (what
/// statistics cost), and the programs' time per event.
fn print_stats_table(bench: &Bench, results: &Results) {
    let rate = |s: &Sample| Some(s.connections_per_s);
    let bpf = |s: &Sample| s.traced.as_ref()?.bpf_ns_per_event;
    println!(
        "| mode | conn/s, bpf_stats on (min-max) | vs same mode, bpf_stats off (per round) | lost \
         (all runs) | BPF ns/event (min-max) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for mode in bench.modes().into_iter().filter(|&m| m != Mode::Untraced) {
        // Per round (the two runs are next to each other), then the median: steadier than the
        // ratio of the medians on a machine whose load drifts.
        let ratios: Vec<f64> = of_mode(&results.stats, mode)
            .zip(of_mode(&results.churn, mode))
            .filter(|(_, off)| off.connections_per_s > 0.0)
            .map(|(on, off)| on.connections_per_s / off.connections_per_s)
            .collect();
        println!(
            "| {} | {} ({}) | {} | {} | {} ({}) |",
            mode.name(),
            number(median_of(&results.stats, mode, rate)),
            spread(&results.stats, mode, rate),
            median(ratios).map_or("-".into(), |r| format!("{r:.2}")),
            lost(&results.stats, mode),
            number(median_of(&results.stats, mode, bpf)),
            spread(&results.stats, mode, bpf),
        );
    }
}

fn ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

/// `min-max` of `f` over the runs of `mode`.
fn spread(samples: &[(Mode, Sample)], mode: Mode, f: impl Fn(&Sample) -> Option<f64>) -> String {
    let values: Vec<f64> = of_mode(samples, mode).filter_map(f).collect();
    min_max(&values, |v| number(Some(v)))
}

fn min_max(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let min = values.iter().copied().reduce(f64::min);
    let max = values.iter().copied().reduce(f64::max);
    match (min, max) {
        (Some(min), Some(max)) => format!("{}-{}", show(min), show(max)),
        _ => "-".into(),
    }
}

/// Events lost over all runs of `mode`, and their share of the events.
fn lost(samples: &[(Mode, Sample)], mode: Mode) -> String {
    let traced: Vec<&Traced> = of_mode(samples, mode)
        .filter_map(|s| s.traced.as_ref())
        .collect();
    if traced.is_empty() {
        return "-".into();
    }
    let lost: u64 = traced.iter().map(|t| t.lost).sum();
    let events: u64 = traced.iter().map(|t| t.events).sum();
    if lost == 0 {
        return "0".into();
    }
    format!(
        "{lost} ({:.1}%)",
        100.0 * lost as f64 / (events + lost) as f64
    )
}

fn print_program_table(bench: &Bench, samples: &[(Mode, Sample)]) {
    println!("| mode | kernel program | runs/s | ns/run |");
    println!("|---|---|---:|---:|");
    for mode in bench.modes() {
        let mut names: Vec<&String> = of_mode(samples, mode)
            .filter_map(|s| s.traced.as_ref())
            .flat_map(|t| t.programs.keys())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let stat = |i: usize| {
                median_of(samples, mode, |s| {
                    let (runs, ns) = s.traced.as_ref()?.programs.get(name)?;
                    Some(if i == 0 { *runs } else { *ns })
                })
            };
            println!(
                "| {} | {name} | {} | {} |",
                mode.name(),
                number(stat(0)),
                number(stat(1))
            );
        }
    }
}

/// What a stress figure is held to.
#[derive(Clone, Copy)]
enum Target {
    None,
    /// Zero in every round.
    Zero,
    AtMost(f64),
    AtLeast(f64),
}

/// One line of the stress table: a figure per round.
struct Row {
    what: String,
    values: Vec<f64>,
    show: fn(f64) -> String,
    target: Target,
}

impl Row {
    fn new(what: impl Into<String>, values: Vec<f64>, show: fn(f64) -> String) -> Self {
        Self {
            what: what.into(),
            values,
            show,
            target: Target::None,
        }
    }

    fn target(self, target: Target) -> Self {
        Self { target, ..self }
    }
}

fn stress_rows(bench: &Bench, results: &Results) -> Vec<Row> {
    let count = |v: f64| number(Some(v));
    let mut rows = Vec::new();
    let lag_of_runs = |mode: Mode| -> Vec<Lag> {
        of_mode(&results.churn, mode)
            .filter_map(|s| s.traced.as_ref()?.lag)
            .collect()
    };
    if bench.runs(Part::Burst) {
        let b = &results.burst;
        rows.push(
            Row::new(
                format!(
                    "burst: events lost in {} s of full churn from idle",
                    BURST.as_secs()
                ),
                b.iter().map(|b| b.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(Row::new(
            "burst: events delivered",
            b.iter().map(|b| b.events as f64).collect(),
            count,
        ));
        rows.push(Row::new(
            "burst: delay p99",
            b.iter()
                .filter_map(|b| b.lag)
                .map(|l| l.delay_p99_ns as f64)
                .collect(),
            ms,
        ));
        rows.push(Row::new(
            "burst: delay max",
            b.iter()
                .filter_map(|b| b.lag)
                .map(|l| l.delay_max_ns as f64)
                .collect(),
            ms,
        ));
    }
    if bench.runs(Part::Drain) {
        let lags: Vec<Lag> = results.drain.iter().filter_map(|d| d.lag).collect();
        rows.push(
            Row::new(
                format!(
                    "drain after {} ms SIGSTOP: events/s",
                    DRAIN_STOP.as_millis()
                ),
                lags.iter().filter_map(Lag::drain_per_s).collect(),
                count,
            )
            .target(Target::AtLeast(TARGET_DRAIN_PER_S)),
        );
        rows.push(Row::new(
            "drain: backlog (events in the largest catch-up)",
            lags.iter().map(|l| l.backlog_events as f64).collect(),
            count,
        ));
        rows.push(Row::new(
            "drain: catch-up time",
            lags.iter().map(|l| l.backlog_drain_ns as f64).collect(),
            ms,
        ));
        rows.push(Row::new(
            "drain: delay max (the stop included)",
            lags.iter().map(|l| l.delay_max_ns as f64).collect(),
            ms,
        ));
        rows.push(
            Row::new(
                "drain: events lost",
                results.drain.iter().map(|d| d.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(Row::new(
            "drain: events delivered",
            results.drain.iter().map(|d| d.events as f64).collect(),
            count,
        ));
    }
    if bench.runs(Part::Churn) {
        for mode in [Mode::Teardowns, Mode::Events] {
            let lags = lag_of_runs(mode);
            let name = mode.name();
            rows.push(Row::new(
                format!("delay p50 at full churn, {name}"),
                lags.iter().map(|l| l.delay_p50_ns as f64).collect(),
                ms,
            ));
            rows.push(
                Row::new(
                    format!("delay p99 at full churn, {name}"),
                    lags.iter().map(|l| l.delay_p99_ns as f64).collect(),
                    ms,
                )
                .target(Target::AtMost(TARGET_DELAY_P99_NS)),
            );
            rows.push(Row::new(
                format!("delay max at full churn, {name}"),
                lags.iter().map(|l| l.delay_max_ns as f64).collect(),
                ms,
            ));
        }
    }
    if bench.runs(Part::Rss) {
        let r = &results.rss;
        let sockets = r.iter().map(|h| h.sockets).max().unwrap_or(0);
        rows.push(
            Row::new(
                format!(
                    "RSS following {} open sockets: VmRSS",
                    number(Some(sockets as f64))
                ),
                r.iter().map(|h| h.rss_kib as f64).collect(),
                mib,
            )
            .target(Target::AtMost(TARGET_RSS_MIB * 1024.0)),
        );
        rows.push(Row::new(
            "RSS: VmHWM",
            r.iter().map(|h| h.hwm_kib as f64).collect(),
            mib,
        ));
        rows.push(Row::new(
            "RSS: VmRSS idle, before the connections",
            r.iter().map(|h| h.idle_rss_kib as f64).collect(),
            mib,
        ));
        rows.push(Row::new(
            "RSS: seconds to open the connections",
            r.iter().map(|h| h.open_s).collect(),
            |s| format!("{s:.1}"),
        ));
        rows.push(
            Row::new(
                "RSS: events lost while they opened",
                r.iter().map(|h| h.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(
            Row::new(
                "RSS: sockets evicted",
                r.iter().map(|h| h.evicted as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
    }
    if bench.runs(Part::HungBurst) {
        rows.extend(hung_burst_rows(&results.hung_burst));
    }
    rows
}

/// The hung burst's rows: per spread over namespaces, the reports and the reader's delay.
fn hung_burst_rows(runs: &[HungBurst]) -> Vec<Row> {
    let count = |v: f64| number(Some(v));
    let seconds = |v: f64| format!("{v:.1} s");
    let mut rows = Vec::new();
    for spread in hung_burst::SPREADS {
        let of: Vec<&HungBurst> = runs.iter().filter(|r| r.namespaces == spread).collect();
        let what = match spread {
            0 => "hung burst: the churn alone".to_owned(),
            1 => format!(
                "hung burst: {} hangs in 1 namespace",
                2 * hung_burst::CONNECTIONS
            ),
            n => format!(
                "hung burst: {} hangs over {n} namespaces",
                2 * hung_burst::CONNECTIONS
            ),
        };
        let lag = |f: fn(&Lag) -> u64| -> Vec<f64> {
            of.iter()
                .filter_map(|r| r.lag.as_ref())
                .map(|l| f(l) as f64)
                .collect()
        };
        if spread > 0 {
            rows.push(
                Row::new(
                    format!("{what}: hangs not reported"),
                    of.iter()
                        .map(|r| (r.hangs - r.reported.min(r.hangs)) as f64)
                        .collect(),
                    count,
                )
                .target(Target::Zero),
            );
            rows.push(Row::new(
                format!("{what}: all reported after the leak"),
                of.iter().filter_map(|r| r.all_reported_s).collect(),
                seconds,
            ));
        }
        rows.push(
            Row::new(
                format!("{what}: lost"),
                of.iter().map(|r| r.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(
            Row::new(
                format!("{what}: kernel-to-reader delay p99"),
                lag(|l| l.delay_p99_ns),
                ms,
            )
            .target(Target::AtMost(TARGET_DELAY_P99_NS)),
        );
        rows.push(
            Row::new(
                format!("{what}: kernel-to-reader delay max"),
                lag(|l| l.delay_max_ns),
                ms,
            )
            .target(Target::AtMost(TARGET_HUNG_DELAY_MAX_NS)),
        );
    }
    rows
}

fn print_stress_table(rows: &[Row]) {
    println!("| measurement | median | min-max | per round | target | met |");
    println!("|---|---:|---:|---|---:|---|");
    for row in rows {
        let median = median(row.values.clone());
        let (target, met) = match row.target {
            Target::None => (String::new(), None),
            Target::Zero => ("0".into(), Some(row.values.iter().all(|&v| v == 0.0))),
            Target::AtMost(t) => (format!("<= {}", (row.show)(t)), median.map(|m| m <= t)),
            Target::AtLeast(t) => (format!(">= {}", (row.show)(t)), median.map(|m| m >= t)),
        };
        let met = match (met, row.values.is_empty()) {
            (_, true) => "",
            (Some(true), _) => "yes",
            (Some(false), _) => "NO",
            (None, _) => "",
        };
        let per_round: Vec<String> = row.values.iter().map(|&v| (row.show)(v)).collect();
        println!(
            "| {} | {} | {} | {} | {target} | {met} |",
            row.what,
            median.map_or("-".into(), row.show),
            min_max(&row.values, row.show),
            if per_round.is_empty() {
                "-".into()
            } else {
                per_round.join(", ")
            },
        );
    }
}

fn print_notes(bench: &Bench, results: &Results) {
    if bench.runs(Part::Churn) {
        print_churn_notes();
    }
    if bench.runs(Part::Stats) {
        if bench.runs(Part::Churn) {
            println!();
        }
        print_stats_notes();
    }
    if !results.burst.is_empty() || !results.drain.is_empty() || !results.rss.is_empty() {
        println!();
        print_stress_notes();
    }
    let evicted: u64 = results
        .churn
        .iter()
        .chain(&results.stats)
        .filter_map(|(_, s)| s.traced.as_ref())
        .map(|t| t.evicted)
        .sum();
    if evicted > 0 {
        println!(
            "\ntcpclose evicted {evicted} sockets from its full table (`--max-sockets`) over all \
             churn runs."
        );
    }
    if bench.tcpstates.is_none() {
        println!("\ntcpstates was not found in {TCPSTATES_PATHS:?} or on PATH.");
    }
}

fn print_churn_notes() {
    println!(
        "conn/s: connections the churn completed per second, medians with the range over runs. \
         CPU/conn: CPU time of the churn's threads (CLOCK_THREAD_CPUTIME_ID, kernel work in their \
         context included) plus the tracer's, per connection; less sensitive than conn/s to \
         other load on the machine. events: TCP state changes the tracer delivered (tcpclose: \
         summary `transitions`; tcpstates: output lines). lost: dropped in the kernel with the \
         buffer full (tcpclose: `lost` + `timewait_lost`; tcpstates: its `lost N events` \
         warnings). tracer CPU: utime + stime of the tracer (/proc/PID/stat, clock ticks) from \
         the start of the churn to {} ms after it, start-up excluded. wakeups: voluntary \
         context switches of the tracer's threads (/proc/PID/task/*/status), a proxy. peak RSS: \
         VmHWM just before SIGINT.",
        DRAIN.as_millis()
    );
}

fn print_stats_notes() {
    println!(
        "bpf_stats: kernel.bpf_stats_enabled makes the kernel read the clock twice around every \
         program run, which slows the traced churn; the churn runs above have it off. Each \
         round measures each tracer once more, the same way, with it on: BPF ns/event is the \
         run time of the tracer's kernel programs (bpf_prog_info run_time_ns, between the start \
         and the end of the churn) per event delivered, and the program table gives their runs \
         and ns per run; `vs same mode, bpf_stats off` is what the statistics themselves cost \
         the churn (the median over rounds of the ratio of the two runs, which are next to each \
         other in each round). The sysctl is put back as it was at the end (also on error or Ctrl-C)."
    );
}

fn print_stress_notes() {
    println!(
        "Stress, each in a fresh namespace with `tcpclose --json` (default ring buffer) \
             started for it. burst: the tracer idles {} s once attached, then {} s of full churn; \
             lost is its summary's `lost` + `timewait_lost`, per round. drain: {} s into full \
             churn the tracer gets SIGSTOP (once its event loop is asleep, not amid a catch-up), {} \
         ms later SIGCONT, and the churn goes on {} s; \
             tcpclose itself measures its largest catch-up (consecutive drains of the ring that \
             each return a full batch of 4096 records, ended by one that returns fewer: records \
             handled, including those that arrived meanwhile, over the time from its first \
             drain's start to its last's end; summary `largest_backlog_events` / \
             `largest_backlog_drain_ns`); the default ring ({} MiB) holds about {} transition \
             records (8-byte header each), beyond which the kernel drops events. delay: for each drain of the ring, CLOCK_MONOTONIC at \
             its start minus the `ts_ns` of the oldest record it handled, in an hdrhistogram \
             (summary `delay_p50_ns`, `delay_p99_ns`, `delay_max_ns`, per drain, not per event); \
             the full-churn rows come from the churn runs. RSS: {} connections ({} sockets) \
             opened to {} listener ports at 127.0.0.1-{} and held, {} s for the tracer to see \
             them, then its VmRSS and VmHWM (/proc/PID/status); the connections are reset after \
             the tracer stopped. They are held by a few helper processes (RLIMIT_NOFILE's hard \
             limit bounds each).",
        BURST_IDLE.as_secs(),
        BURST.as_secs(),
        DRAIN_LEAD.as_secs(),
        DRAIN_STOP.as_millis(),
        DRAIN_TAIL.as_secs_f64(),
        DEFAULT_RING_BYTES >> 20,
        number(Some(ring_records() as f64)),
        number(Some(HELD_CONNECTIONS as f64)),
        number(Some(2.0 * HELD_CONNECTIONS as f64)),
        HOLD_PORTS,
        HOLD_ADDRS,
        HOLD_SEEN.as_secs(),
    );
}

/// Transition records the default ring buffer holds: each takes an 8-byte header and its size
/// rounded up to 8 bytes.
fn ring_records() -> usize {
    DEFAULT_RING_BYTES as usize / (8 + TRANSITION_EVENT_SIZE.next_multiple_of(8))
}

fn of_mode(samples: &[(Mode, Sample)], mode: Mode) -> impl Iterator<Item = &Sample> {
    samples
        .iter()
        .filter(move |(m, _)| *m == mode)
        .map(|(_, s)| s)
}

fn median_of(
    samples: &[(Mode, Sample)],
    mode: Mode,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Option<f64> {
    median(of_mode(samples, mode).filter_map(f).collect())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[mid]),
        _ => Some((v[mid - 1] + v[mid]) / 2.0),
    }
}

/// Nanoseconds as milliseconds.
fn ms(ns: f64) -> String {
    let ms = ns / 1e6;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// KiB as MiB.
fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// A rounded number with thousands separated, `-` for none.
fn number(value: Option<f64>) -> String {
    let Some(value) = value else {
        return "-".into();
    };
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < -0.5 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(number(Some(2_500_000.4)), "2,500,000");
        assert_eq!(number(Some(-1234.0)), "-1,234");
        assert_eq!(number(None), "-");
        assert_eq!(ms(45_300_000.0), "45.3 ms");
        assert_eq!(ms(1_234_000.0), "1.23 ms");
        assert_eq!(mib(65_536.0), "64.0 MiB");
    }

    #[test]
    fn lag_comes_from_the_summary() {
        let summary: Value = serde_json::from_str(
            r#"{"type":"summary","delay_p50_ns":1,"delay_p99_ns":2,"delay_max_ns":3,
                "largest_backlog_events":250000,"largest_backlog_drain_ns":100000000}"#,
        )
        .unwrap();
        let lag = lag_of(&summary).unwrap();
        assert_eq!(lag.delay_p99_ns, 2);
        assert_eq!(lag.drain_per_s(), Some(2.5e6));
        assert!(lag_of(&serde_json::json!({"type": "summary"})).is_none());
    }
}
