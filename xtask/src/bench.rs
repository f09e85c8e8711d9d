//! `cargo xtask bench`: what tracing costs a host that churns TCP connections.
//!
//! Several client/server pairs churn loopback connections in a network namespace of the bench's
//! own (a fresh one per measurement), untraced, under `tcpclose` (teardowns: the transition program plus the timer programs
//! that follow timewait sockets and must reject every other kernel timer), under `tcpclose
//! --events` (the transition program alone) and under libbpf-tools' `tcpstates` when it is
//! installed, interleaved over several rounds on one machine. The tracers run in the host
//! namespace (their tracepoints are global) with their output going to files. It prints the
//! medians as a markdown table: churn rate relative to untraced, and per tracer the events it
//! delivered, lost, its CPU time, its kernel programs' time (`kernel.bpf_stats_enabled`), its
//! wakeups and its peak memory.

use std::{
    collections::BTreeMap,
    env,
    fs::{self, File},
    io::{self, Read as _, Seek as _, SeekFrom},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{self, Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;
use tcpclose_common::{TIMER_PROGRAMS, TRANSITION_PROGRAM};

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

/// What `cargo xtask bench` was asked for.
pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub pairs: usize,
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

/// Everything the measurements share.
struct Bench {
    tcpclose: PathBuf,
    tcpstates: Option<PathBuf>,
    /// Where the tracers' output goes.
    dir: TempDir,
    pairs: usize,
    period: Duration,
}

impl Bench {
    fn modes(&self) -> Vec<Mode> {
        Mode::ALL
            .into_iter()
            .filter(|&m| m != Mode::Tcpstates || self.tcpstates.is_some())
            .collect()
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

/// One measurement.
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
    bpf_ns_per_event: f64,
    wakeups_per_s: f64,
    peak_rss_kib: u64,
    /// Sockets tcpclose dropped from its full table (summary `evicted`).
    evicted: u64,
    /// Per kernel program of the tracer: runs per second and ns per run.
    programs: BTreeMap<String, (f64, f64)>,
}

pub fn bench(tcpclose: &Path, options: &Options) -> Result<()> {
    if options.rounds == 0 || options.pairs == 0 || options.seconds == 0 {
        bail!("--rounds, --pairs and --seconds must be at least 1");
    }
    let bench = Bench {
        tcpclose: tcpclose.to_path_buf(),
        tcpstates: find_tcpstates(),
        dir: TempDir::create()?,
        pairs: options.pairs,
        period: Duration::from_secs(options.seconds),
    };
    let previous = fs::read_to_string(BPF_STATS)
        .with_context(|| format!("reading {BPF_STATS} (run the benchmark as root)"))?;
    fs::write(BPF_STATS, "1").with_context(|| format!("enabling {BPF_STATS}"))?;
    let result = rounds_of(&bench, options.rounds);
    // Statistics cost a little on every program run: leave the host as it was.
    let _ = fs::write(BPF_STATS, previous.trim());
    let samples = result?;
    report(&bench, options, &samples);
    Ok(())
}

fn rounds_of(bench: &Bench, rounds: usize) -> Result<Vec<(Mode, Sample)>> {
    let modes = bench.modes();
    let mut samples = Vec::new();
    for round in 0..rounds {
        // Rotate the order so that no mode always runs first (warm caches, thermal drift).
        for i in 0..modes.len() {
            let mode = modes[(i + round) % modes.len()];
            let sample = measure(bench, mode).with_context(|| format!("measuring {mode:?}"))?;
            eprintln!("round {}: {}", round + 1, progress(mode, &sample));
            samples.push((mode, sample));
        }
    }
    Ok(samples)
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
    }
    line
}

/// Measures `mode` in a fresh namespace, so that every measurement starts without timewait
/// sockets: one namespace for the whole bench would hold the last minute's, reach
/// `tcp_max_tw_buckets` within seconds, and from then on the kernel would skip TIME_WAIT (and
/// the timer programs' work) for most connections.
fn measure(bench: &Bench, mode: Mode) -> Result<Sample> {
    let netns = Netns::create()?;
    let sample = measure_in(bench, mode, &netns);
    drop(netns);
    thread::sleep(SETTLE);
    sample
}

fn measure_in(bench: &Bench, mode: Mode, netns: &Netns) -> Result<Sample> {
    let mut tracer = match bench.tracer_command(mode) {
        Some(cmd) => Some(Tracer::start(cmd, mode, &bench.dir.0)?),
        None => None,
    };
    let before = tracer.as_ref().map(Tracer::usage).transpose()?;
    let started = Instant::now();
    let churned = churn(netns, bench.pairs, bench.period)?;
    let elapsed = started.elapsed().as_secs_f64();
    let traced = match (tracer.as_mut(), before) {
        (Some(tracer), Some(before)) => Some(finish(tracer, &before, elapsed)?),
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
fn finish(tracer: &mut Tracer, before: &Usage, elapsed: f64) -> Result<Traced> {
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
        events_per_s: delivered.events as f64 / elapsed,
        cpu_ns,
        cpu_ns_per_event: cpu_ns as f64 / events,
        wakeups_per_s: switches as f64 / (elapsed + DRAIN.as_secs_f64()),
        peak_rss_kib,
        ..Traced::default()
    };
    let mut bpf_ns = 0;
    for (name, runs, ns) in runs_between(&before.programs, &programs_after) {
        bpf_ns += ns;
        let ns_per_run = ns as f64 / runs.max(1) as f64;
        traced
            .programs
            .insert(name, (runs as f64 / elapsed, ns_per_run));
    }
    traced.bpf_ns_per_event = bpf_ns as f64 / events;
    Ok(traced)
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
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns(2) on a namespace fd that stays open for the call; affects only this
        // thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("setns({path})"));
        }
        Ok(())
    }
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

fn report(bench: &Bench, options: &Options, samples: &[(Mode, Sample)]) {
    println!();
    println!("{}", machine_facts(bench, options));
    println!();
    print_main_table(bench, samples);
    println!();
    print_program_table(bench, samples);
    println!();
    print_notes(bench, samples);
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
    format!(
        "Linux {kernel}, {cores} cores ({cpu}). Loopback churn: {} client/server pairs (threads) \
         in a network namespace of their own (fresh per run), server closes first; {} interleaved rounds of {} s; \
         medians. Tracers in the host namespace, output to a file.",
        bench.pairs, options.rounds, options.seconds,
    )
}

fn print_main_table(bench: &Bench, samples: &[(Mode, Sample)]) {
    let rate = |s: &Sample| Some(s.connections_per_s);
    let cpu = |s: &Sample| Some(s.cpu_ns_per_connection / 1e3);
    let (base_rate, base_cpu) = (
        median_of(samples, Mode::Untraced, rate),
        median_of(samples, Mode::Untraced, cpu),
    );
    println!(
        "| mode | conn/s (min-max) | vs untraced | CPU us/conn | vs untraced | events/s | lost \
         (all runs) | tracer CPU ns/event | BPF ns/event | wakeups/s | peak RSS |"
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
            number(traced(|t| t.bpf_ns_per_event)),
            number(traced(|t| t.wakeups_per_s)),
            traced(|t| t.peak_rss_kib as f64)
                .map_or("-".into(), |kib| format!("{:.1} MiB", kib / 1024.0)),
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
    let min = values.iter().copied().reduce(f64::min);
    let max = values.iter().copied().reduce(f64::max);
    format!("{}-{}", number(min), number(max))
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

fn print_notes(bench: &Bench, samples: &[(Mode, Sample)]) {
    println!(
        "conn/s: connections the churn completed per second, medians with the range over runs. \
         CPU/conn: CPU time of the churn's threads (CLOCK_THREAD_CPUTIME_ID, kernel work in their \
         context included) plus the tracer's, per connection; less sensitive than conn/s to \
         other load on the machine. events: TCP state changes the tracer delivered (tcpclose: summary `transitions`; \
         tcpstates: output lines). lost: dropped in the kernel with the buffer full (tcpclose: \
         `lost` + `timewait_lost`; tcpstates: its `lost N events` warnings). tracer CPU: utime + stime \
         of the tracer (/proc/PID/stat, clock ticks) from the start of the churn to {} ms after \
         it, start-up excluded. BPF: run time of the tracer's kernel programs \
         (kernel.bpf_stats_enabled, which adds its own clock reads). wakeups: voluntary context \
         switches of the tracer's threads (/proc/PID/task/*/status), a proxy. peak RSS: VmHWM \
         just before SIGINT.",
        DRAIN.as_millis()
    );
    let evicted: u64 = samples
        .iter()
        .filter_map(|(_, s)| s.traced.as_ref())
        .map(|t| t.evicted)
        .sum();
    if evicted > 0 {
        println!(
            "\ntcpclose evicted {evicted} sockets from its full table (`--max-sockets`) over all \
             runs."
        );
    }
    if bench.tcpstates.is_none() {
        println!("\ntcpstates was not found in {TCPSTATES_PATHS:?} or on PATH.");
    }
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
    let mut v: Vec<f64> = of_mode(samples, mode).filter_map(f).collect();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[mid]),
        _ => Some((v[mid - 1] + v[mid]) / 2.0),
    }
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
