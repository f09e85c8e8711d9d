//! What the kernel says about a tracer: its process's CPU time and wakeups (`/proc`), and its
//! kernel programs' runs and run time (`bpf_prog_info`, with `kernel.bpf_stats_enabled` on).

use std::{collections::BTreeMap, fs};

use anyhow::{Context as _, Result, bail};
use tcpclose_common::{TIMER_PROGRAMS, TRANSITION_PROGRAM};

use super::files::{read_proc, status_field};

/// The kernel keeps the first 15 characters of a program's name (BPF_OBJ_NAME_LEN).
const NAME_LEN: usize = 15;
/// libbpf-tools' tcpstates program on `sock:inet_sock_set_state`.
const TCPSTATES_PROGRAM: &str = "handle_set_state";

/// What a process used so far.
pub(super) struct ProcessUsage {
    /// utime + stime of all its threads, in ns (clock-tick resolution).
    pub(super) cpu_ns: u64,
    /// Voluntary context switches of its live threads: each is a sleep, so the count is a proxy
    /// for its wakeups.
    pub(super) voluntary_switches: u64,
}

pub(super) fn process_usage(pid: u32) -> Result<ProcessUsage> {
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
pub(super) fn program_ids(pid: u32) -> Result<Vec<u32>> {
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
pub(super) struct ProgramRuns {
    name: String,
    runs: u64,
    ns: u64,
}

pub(super) fn program_runs(ids: &[u32]) -> Result<BTreeMap<u32, ProgramRuns>> {
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
pub(super) fn runs_between(
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
