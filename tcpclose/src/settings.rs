//! What a run does, resolved once from the command line: the run loop and the pipelines read
//! this plain value, never the command line itself.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{hung::Thresholds, render::Format, stats::GroupBy, tracer::KernelFilter};

/// One run's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    pub format: Format,
    pub mode: Mode,
    /// What the kernel programs let through.
    pub filter: KernelFilter,
    /// The ring buffer's size in bytes.
    pub ring_bytes: u32,
    /// The kernel's BTF from this file instead of `/sys/kernel/btf/vmlinux`.
    pub btf: Option<PathBuf>,
    /// Stop after this long; `None`: at SIGINT or SIGTERM.
    pub duration: Option<Duration>,
    /// Sockets followed at once at most.
    pub max_sockets: usize,
    /// The kernel programs' diagnostics from this level on (aya-log's numbering; 0: off).
    pub kernel_log: u8,
    /// Typed or raw kernel programs (`--programs`).
    pub programs: crate::tracer::ProgramChoice,
    /// Only sockets whose owner, as tcpclose knows it, is one of these processes (`--pid`);
    /// every socket when empty. Applied in userspace: the kernel does not know a socket's
    /// owner when a segment or a timer changes its state.
    pub pids: Vec<u32>,
}

/// Whether a socket owned by `pid` (`None`: not known) passes `--pid`.
pub fn owner_passes(pids: &[u32], pid: Option<u32>) -> bool {
    pids.is_empty() || pid.is_some_and(|pid| pids.contains(&pid))
}

/// What a run prints.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Every state change (`--events`).
    Events,
    /// One record per connection that ended, and hung teardowns as they happen (the default).
    Teardowns(TeardownSettings),
}

#[derive(Clone, Debug)]
pub struct TeardownSettings {
    pub thresholds: Thresholds,
    /// The distributions and the leak view every so often (`--interval`); always at exit.
    pub interval: Option<Duration>,
    /// The distributions split by this key, named so.
    pub group_by: Option<(GroupBy, &'static str)>,
    /// Serve Prometheus metrics there.
    pub metrics: Option<SocketAddr>,
    /// Label the phase histogram and the hung gauge so, with at most this many values.
    pub metrics_label: Option<(crate::metrics::LabelBy, usize)>,
}

impl Settings {
    /// Whether timewait sockets are followed (their timer programs attached).
    pub fn follows_timewait(&self) -> bool {
        matches!(self.mode, Mode::Teardowns(_))
    }
}
