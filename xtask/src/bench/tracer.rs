//! The tracer a measurement runs: tcpclose (`--json`, `--events --json`) or libbpf-tools'
//! `tcpstates`, in the host namespace (their tracepoints are global), its output going to files.
//! Started, stopped and killed by the tests library's [`ToFiles`]; what it delivered is read from
//! those files.

use std::{
    collections::BTreeMap,
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use serde_json::Value;
use tcpclose_tests::tracer::ToFiles;

use super::{
    Mode, START_TIMEOUT, STOP_TIMEOUT,
    files::{count_lines, hex_field, read_proc, read_tail},
    usage::{ProcessUsage, ProgramRuns, process_usage, program_ids, program_runs},
};

/// Where Debian's libbpf-tools puts `tcpstates` (`/usr/sbin` is not on every user's PATH).
pub(super) const TCPSTATES_PATHS: [&str; 2] = ["/usr/sbin/tcpstates", "/usr/bin/tcpstates"];

/// A tracer running in the host namespace, its standard output and error going to files.
pub(crate) struct Tracer {
    files: ToFiles,
    mode: Mode,
    /// Ids of the kernel programs it holds.
    pub(super) programs: Vec<u32>,
}

/// What a tracer's process and programs used up to some moment.
pub(super) struct Usage {
    pub(super) process: ProcessUsage,
    pub(super) programs: BTreeMap<u32, ProgramRuns>,
}

/// What a tracer says it delivered.
pub(crate) struct Delivered {
    pub(crate) events: u64,
    pub(crate) lost: u64,
    pub(super) evicted: u64,
    /// tcpclose's account of how far it fell behind (none from tcpstates, or from a tcpclose
    /// that predates it).
    pub(crate) lag: Option<Lag>,
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

impl Tracer {
    /// Starts `cmd`, the tracer of `mode`, with its output to files in `dir`, and waits until it
    /// is ready: tcpclose says so on stderr once attached; tcpstates catches SIGINT once its
    /// programs are attached and its perf buffer is open, and says nothing (its header sits in
    /// stdio's buffer).
    pub(crate) fn start(mut cmd: Command, mode: Mode, dir: &Path) -> Result<Self> {
        let files = match mode {
            Mode::Tcpstates => ToFiles::start_when(&mut cmd, dir, START_TIMEOUT, catches_sigint),
            _ => ToFiles::start(&mut cmd, dir, START_TIMEOUT),
        }
        .with_context(|| format!("starting {}", mode.name()))?;
        let programs = program_ids(files.pid())?;
        Ok(Self {
            files,
            mode,
            programs,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.files.pid()
    }

    /// Its standard output and error, as files.
    pub(crate) fn stdout(&self) -> &Path {
        &self.files.stdout
    }

    pub(crate) fn stderr(&self) -> &Path {
        &self.files.stderr
    }

    pub(super) fn usage(&self) -> Result<Usage> {
        Ok(Usage {
            process: process_usage(self.pid())?,
            programs: program_runs(&self.programs)?,
        })
    }

    /// Interrupts it as Ctrl-C would, waits for it, and reads what it delivered.
    pub(crate) fn stop(&mut self) -> Result<Delivered> {
        self.files
            .stop(STOP_TIMEOUT)
            .with_context(|| self.mode.name())?;
        match self.mode {
            Mode::Tcpstates => tcpstates_delivered(self.stdout(), self.stderr()),
            _ => tcpclose_delivered(self.stdout()),
        }
    }
}

/// Whether the process `pid` catches SIGINT (`SigCgt` in its status).
fn catches_sigint(pid: u32) -> bool {
    read_proc(pid, "status")
        .ok()
        .and_then(|status| hex_field(&status, "SigCgt:"))
        .is_some_and(|caught| caught & (1 << (libc::SIGINT - 1)) != 0)
}

/// From tcpclose's `summary` record, the last line of its JSON output.
fn tcpclose_delivered(stdout: &Path) -> Result<Delivered> {
    let summary = summary(stdout)?;
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

/// tcpclose's `summary` record, the last line of its JSON output in the file `stdout`.
pub(crate) fn summary(stdout: &Path) -> Result<Value> {
    let tail = read_tail(stdout, 64 * 1024)?;
    let line = tail
        .lines()
        .rev()
        .find(|line| line.contains(r#""type":"summary""#))
        .context("tcpclose printed no summary record")?;
    serde_json::from_str(line).context("parsing tcpclose's summary")
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

pub(super) fn find_tcpstates() -> Option<PathBuf> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
