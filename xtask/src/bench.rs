//! `cargo xtask bench`: what tracing costs a host that churns TCP connections.
//!
//! Runs a loopback connect/accept/close churn untraced, under `tcpclose --events` (the transition
//! program alone) and under `tcpclose` (plus the timer programs that follow timewait sockets and
//! must reject every other kernel timer), interleaved over several rounds on one machine, and
//! prints medians side by side: churn rate relative to untraced, and the kernel programs' own
//! time per run from the kernel's BPF statistics (`kernel.bpf_stats_enabled`).

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tcpclose_common::{TIMER_PROGRAMS, TRANSITION_PROGRAM};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// The kernel keeps the first 15 characters of a program's name (BPF_OBJ_NAME_LEN).
const NAME_LEN: usize = 15;
/// The programs measured: the transition program, then the timer programs.
const PROGRAMS: [&str; 4] = [
    TRANSITION_PROGRAM,
    TIMER_PROGRAMS[0].0,
    TIMER_PROGRAMS[1].0,
    TIMER_PROGRAMS[2].0,
];

fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(NAME_LEN)]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Untraced,
    Events,
    Teardowns,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Untraced, Mode::Events, Mode::Teardowns];

    fn name(self) -> &'static str {
        match self {
            Mode::Untraced => "untraced",
            Mode::Events => "tcpclose --events",
            Mode::Teardowns => "tcpclose (timewait)",
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    connections_per_s: f64,
    /// Per program of [`PROGRAMS`]: runs per second and ns per run. The timer programs run for
    /// every kernel timer event and reject almost all of them.
    runs_per_s: [f64; 4],
    ns_per_run: [f64; 4],
}

pub fn bench(binary: &Path, rounds: usize, seconds: u64) -> Result<()> {
    let previous = fs::read_to_string(BPF_STATS)
        .with_context(|| format!("reading {BPF_STATS} (run the benchmark as root)"))?;
    fs::write(BPF_STATS, "1").with_context(|| format!("enabling {BPF_STATS}"))?;
    let result = rounds_of(binary, rounds, Duration::from_secs(seconds));
    // Statistics cost a little on every program run: leave the host as it was.
    let _ = fs::write(BPF_STATS, previous.trim());
    let samples = result?;

    let median = |mode: Mode, f: &dyn Fn(&Sample) -> f64| median(&samples, mode, f);
    let base = median(Mode::Untraced, &|s| s.connections_per_s);
    println!("\nloopback churn, {rounds} interleaved rounds of {seconds} s, medians\n");
    println!("| {:<20} | {:>10} | {:>8} |", "mode", "conn/s", "relative");
    println!("|{:-<22}|{:->12}|{:->10}|", "", "", "");
    for mode in Mode::ALL {
        let rate = median(mode, &|s| s.connections_per_s);
        let relative = if base > 0.0 { rate / base } else { 0.0 };
        println!("| {:<20} | {rate:>10.0} | {relative:>8.2} |", mode.name());
    }
    println!("\nkernel programs (kernel.bpf_stats_enabled; its own clock reads add to ns/run):\n");
    println!(
        "| {:<20} | {:<19} | {:>10} | {:>7} |",
        "mode", "program", "runs/s", "ns/run"
    );
    println!("|{:-<22}|{:-<21}|{:->12}|{:->9}|", "", "", "", "");
    for mode in [Mode::Events, Mode::Teardowns] {
        for (i, program) in PROGRAMS.iter().enumerate() {
            let runs = median(mode, &|s| s.runs_per_s[i]);
            if runs == 0.0 {
                continue;
            }
            println!(
                "| {:<20} | {:<19} | {runs:>10.0} | {:>7.0} |",
                mode.name(),
                program,
                median(mode, &|s| s.ns_per_run[i]),
            );
        }
    }
    Ok(())
}

fn median(samples: &[(Mode, Sample)], mode: Mode, f: &dyn Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|(m, _)| *m == mode)
        .map(|(_, s)| f(s))
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn rounds_of(binary: &Path, rounds: usize, period: Duration) -> Result<Vec<(Mode, Sample)>> {
    let mut samples = Vec::new();
    for round in 0..rounds {
        // Rotate the order so that no mode always runs first (warm caches, thermal drift).
        for i in 0..Mode::ALL.len() {
            let mode = Mode::ALL[(i + round) % Mode::ALL.len()];
            let sample = measure(binary, mode, period)?;
            eprintln!(
                "round {}: {:<20} {:>8.0} conn/s",
                round + 1,
                mode.name(),
                sample.connections_per_s
            );
            samples.push((mode, sample));
        }
    }
    Ok(samples)
}

fn measure(binary: &Path, mode: Mode, period: Duration) -> Result<Sample> {
    // Any loopback address: the churn rotates over 127.0.0.0/8.
    let listener = TcpListener::bind("0.0.0.0:0").context("binding the churn listener")?;
    let port = listener.local_addr()?.port();
    // The programs this measurement's tcpclose loads are the ones that were not there before.
    let existing = program_stats(&[])?
        .into_iter()
        .map(|(id, ..)| id)
        .collect::<Vec<_>>();
    let mut tracer = match mode {
        Mode::Untraced => None,
        Mode::Events => Some(start(binary, &["--events", "--port", &port.to_string()])?),
        Mode::Teardowns => Some(start(binary, &["--port", &port.to_string()])?),
    };
    let before = program_stats(&existing)?;
    let started = Instant::now();
    let connections = churn(listener, period);
    let elapsed = started.elapsed().as_secs_f64();
    let after = program_stats(&existing)?;
    if let Some(child) = tracer.as_mut() {
        stop(child)?;
    }
    let mut sample = Sample {
        connections_per_s: connections as f64 / elapsed,
        ..Sample::default()
    };
    for (i, program) in PROGRAMS.iter().enumerate() {
        let name = kernel_name(program);
        let find = |stats: &[(u32, String, u64, u64)]| {
            stats
                .iter()
                .filter(|(_, n, ..)| n == name)
                .fold((0, 0), |(r, t), (.., r1, t1)| (r + r1, t + t1))
        };
        let ((r0, t0), (r1, t1)) = (find(&before), find(&after));
        let runs = r1.saturating_sub(r0);
        sample.runs_per_s[i] = runs as f64 / elapsed;
        if runs > 0 {
            sample.ns_per_run[i] = t1.saturating_sub(t0) as f64 / runs as f64;
        }
    }
    Ok(sample)
}

/// `(id, name, run count, run time ns)` of the tcpclose programs loaded now, except `skip`.
fn program_stats(skip: &[u32]) -> Result<Vec<(u32, String, u64, u64)>> {
    let mut stats = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if skip.contains(&info.id()) || !PROGRAMS.iter().any(|p| kernel_name(p) == name) {
            continue;
        }
        let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
        stats.push((info.id(), name.to_owned(), info.run_count(), ns));
    }
    Ok(stats)
}

fn start(binary: &Path, args: &[&str]) -> Result<Child> {
    let mut child = Command::new(binary)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().context("tcpclose's stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("Tracing") => break,
            Some(Ok(_)) => {}
            _ => {
                let status = child.wait()?;
                bail!("tcpclose {args:?} ended before it was ready: {status}");
            }
        }
    }
    // Keep draining stderr so that the summary cannot block it.
    thread::spawn(move || lines.for_each(drop));
    Ok(child)
}

fn stop(child: &mut Child) -> Result<()> {
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc_kill(pid, 2) };
    let status = child.wait()?;
    if !status.success() {
        bail!("tcpclose ended with {status}");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

/// Connects as fast as one thread can while another accepts and closes at once, for `period`;
/// returns the connections made. The server closes first, so its side goes through FIN_WAIT and
/// TIME_WAIT on a timewait socket (the timer programs' work) and the client, which closes on
/// EOF, through CLOSE_WAIT and LAST_ACK. Had the clients closed first, their ephemeral ports,
/// held 60 s in TIME_WAIT, would slow every connect() down as they run out.
fn churn(listener: TcpListener, period: Duration) -> u64 {
    let port = match listener.local_addr() {
        Ok(addr) => addr.port(),
        Err(_) => return 0,
    };
    let addrs: Vec<std::net::SocketAddr> = (1..=64u8)
        .map(|i| std::net::SocketAddr::from(([127, 0, 0, i], port)))
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let done = done.clone();
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                // Accepted and closed at once.
                let _ = listener.accept();
            }
        })
    };
    let deadline = Instant::now() + period;
    let mut made = 0;
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect(addrs[made as usize % addrs.len()]) {
            // Wait for the server's FIN before closing.
            let _ = stream.read(&mut [0; 1]);
            made += 1;
        }
    }
    done.store(true, Ordering::Relaxed);
    // Unblock the acceptor.
    let _ = TcpStream::connect(addrs[0]);
    let _ = acceptor.join();
    made
}
