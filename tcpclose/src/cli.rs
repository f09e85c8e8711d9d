//! Command-line interface.

use std::time::Duration;

use clap::Parser;
use tcpclose_common::DEFAULT_RING_BYTES;

use crate::{hung::Thresholds, states::DEFAULT_MAX_SOCKETS, teardown::Phase};

use crate::{
    render::Format,
    settings::{Mode, Settings, TeardownSettings},
    tracer::KernelFilter,
};

const EXAMPLES: &str = "\
Examples:
  tcpclose                          one line per connection that ends, with its phases timed,
                                    and a HUNG line for each socket stuck in a teardown state
  tcpclose --port 443 --json        the same for port 443, as JSON lines (pipe into jq)
  tcpclose --hung CLOSE_WAIT=5s -i 30s
                                    who leaks CLOSE_WAIT: alerts after 5 s, and every 30 s the
                                    processes with the most hung sockets
  tcpclose --events                 every TCP state change on this host, live
  tcpclose --events --json -d 10s   JSON lines for 10 seconds, then a summary record

Teardown records (the default):
  SIDE      client (opened by connect) or server (accepted from a listener)
  CLOSE     active (we sent the first FIN), passive (the peer's FIN came first),
            simultaneous (both FINs crossed: CLOSING), reset (ended by an RST, or closed
            with SO_LINGER 0 or unread data), failed (never established: refused, timed
            out), fin_timeout (we closed, the peer never sent its FIN: the orphaned
            FIN_WAIT2 ran out after net.ipv4.tcp_fin_timeout)
  TEARDOWN  from leaving ESTABLISHED to the end of the last phase
  PHASES    time spent in each of FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT, CLOSE_WAIT,
            LAST_ACK. After the application closes, the kernel moves a socket in
            FIN_WAIT2 or TIME_WAIT to a timewait socket; tcpclose times those phases from
            its timer. `~` marks durations whose boundary came from a timer expiry, good
            to one jiffy (resolution_ns in JSON). A client that closes first is reported
            when its TIME_WAIT ends, 60 s later.
  HUNG      a socket in a teardown state longer than its --hung threshold, still there,
            named with the process holding it now (as `ss -p` finds it); `>` before the
            age: it was already there when tcpclose started. RESOLVED when it moves on.
  (partial) tcpclose did not see the whole life (it started mid-way, or an event was
            lost): phases it did not see whole are absent, never 0.

Needs root, or CAP_BPF and CAP_PERFMON (Linux 5.8+), and the kernel's BTF
(/sys/kernel/btf/vmlinux, or --btf). Following timewait sockets with raw programs reads
/proc/kallsyms (CAP_SYSLOG; typed programs need not); naming the owners of hung sockets reads
/proc/PID/fd (CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE).
PID and COMM are shown only for transitions a system call makes (connect, listen, close,
shutdown): the others happen in softirq or timer context, where the current task is not
the socket's owner.";

/// Watch how TCP connections end.
///
/// tcpclose follows every TCP state change on this host with an eBPF program on the
/// sock:inet_sock_set_state tracepoint, timestamped in the kernel, and prints one line per
/// connection that ends: how it ended and how long each disconnect phase took.
#[derive(Parser, Debug)]
#[command(name = "tcpclose", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Print every TCP state change instead of teardowns, one line each: time, owner, addresses,
    /// OLD -> NEW and the milliseconds the socket spent in OLD (blank when tcpclose did not see
    /// it enter OLD).
    #[arg(long)]
    pub events: bool,

    /// Print JSON lines (one object per line, ending with a "summary" record) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Stop after this long, e.g. 5s, 500ms, 2m [default: until Ctrl-C or SIGTERM].
    #[arg(short, long, value_name = "D", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Every D, print the teardown latency distributions since start (a log2 histogram per
    /// phase, percentiles per phase and close kind) and the leak view (per teardown state, the
    /// processes with the most sockets hung now and the most newly hung during the interval).
    /// Both are printed on exit too.
    #[arg(short, long, value_name = "D", value_parser = parse_duration, conflicts_with = "events")]
    pub interval: Option<Duration>,

    /// Only sockets whose local or remote port is N (repeatable).
    #[arg(short, long = "port", value_name = "N", value_parser = parse_port)]
    pub ports: Vec<u16>,

    /// Only sockets whose local port is N (repeatable).
    #[arg(long = "lport", value_name = "N", value_parser = parse_port)]
    pub local_ports: Vec<u16>,

    /// Only sockets whose remote port is N (repeatable).
    #[arg(long = "rport", value_name = "N", value_parser = parse_port)]
    pub remote_ports: Vec<u16>,

    /// Only sockets made in the cgroup2 cgroup PATH or below it (repeatable): a directory of the
    /// cgroup2 hierarchy, absolute (/sys/fs/cgroup/kubepods.slice) or relative to its root
    /// (/kubepods.slice). An accepted socket belongs to its listener's cgroup. Filtered in the
    /// kernel.
    #[arg(long = "cgroup", value_name = "PATH", value_parser = parse_cgroup)]
    pub cgroups: Vec<u64>,

    /// Only sockets in this network namespace (repeatable): its inode number, as
    /// `stat -L -c %i /proc/PID/ns/net` or `lsns -t net` show it, or a path to it
    /// (/proc/PID/ns/net, /run/netns/NAME). Filtered in the kernel.
    #[arg(long = "netns", value_name = "INODE|PATH", value_parser = parse_netns)]
    pub netns: Vec<u32>,

    /// Only sockets whose owner, as tcpclose knows it, is process N (repeatable): the process
    /// that connected, listened or closed it, or that holds it when a hang is reported. Sockets
    /// whose owner is not known yet are followed until it is, and dropped then if it differs.
    #[arg(long = "pid", value_name = "N", value_parser = parse_pid)]
    pub pids: Vec<u32>,

    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Follow at most N sockets at once (about 200 bytes each). When the table is full the
    /// sockets idle longest are dropped (those reported hung last) and counted in the summary;
    /// with --events their transitions are still printed, without durations.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SOCKETS, value_parser = parse_max_sockets)]
    pub max_sockets: usize,

    /// Report sockets stuck in a teardown state while they are stuck. `--hung D` sets one
    /// threshold for FIN_WAIT1, FIN_WAIT2, CLOSING, CLOSE_WAIT and LAST_ACK; `--hung STATE=D`
    /// sets one state's, TIME_WAIT included (repeatable; D may be `off`); `--hung off` turns
    /// reporting off. Defaults: CLOSE_WAIT=60s (the application has not closed a socket its peer
    /// closed: a leak), FIN_WAIT1=30s, CLOSING=30s, LAST_ACK=30s (the peer does not acknowledge
    /// our FIN), FIN_WAIT2=90s (the peer never sends its FIN), TIME_WAIT off (it always lasts 60 s).
    #[arg(long, value_name = "[STATE=]D", value_parser = parse_hung, conflicts_with = "events")]
    pub hung: Vec<HungSetting>,

    /// Serve Prometheus metrics on http://ADDR/metrics: a bare port listens on 127.0.0.1 only;
    /// name the interface to listen elsewhere (0.0.0.0:9464, [::]:9464). Metric names and
    /// meanings: README, "Metrics". The per-state metrics need every state change, so the
    /// handshakes' ends are then read too (a fifth more records than without --metrics). An
    /// address that cannot be listened on (in use) is refused before tracing starts (status 2).
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_listen, conflicts_with = "events")]
    pub metrics: Option<std::net::SocketAddr>,

    /// Label the phase histogram and the hung gauge by the socket's container (`container_id`,
    /// its full id) or pod (`pod_uid`). The busiest --metrics-label-top values get series of
    /// their own, re-ranked every minute; the rest count as "other", sockets outside containers
    /// as "none". Each value costs a Prometheus server about 150 more series: README, "Metrics".
    #[arg(long, value_name = "KEY", requires = "metrics")]
    pub metrics_label: Option<crate::metrics::LabelBy>,

    /// How many values of --metrics-label get series of their own.
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::metrics::label::DEFAULT_TOP,
        value_parser = clap::value_parser!(u16).range(1..=1000),
        requires = "metrics_label"
    )]
    pub metrics_label_top: u16,

    /// Split the distributions by local port, remote port, command (of the owner, when a system
    /// call revealed it), container (short id), pod (UID), cgroup (path) or network namespace
    /// (inode); the 10 largest groups are shown, the rest as "other". Grouped by container, pod,
    /// cgroup or netns, the leak view counts hung sockets per group instead of per process.
    #[arg(long, value_name = "KEY", conflicts_with = "events")]
    pub group_by: Option<GroupByArg>,

    /// Read the kernel's type information (BTF) from PATH instead of /sys/kernel/btf/vmlinux,
    /// for kernels built without CONFIG_DEBUG_INFO_BTF: BTFHub publishes a file for most
    /// distribution kernels. It must describe the running kernel exactly.
    #[arg(long, value_name = "PATH")]
    pub btf: Option<std::path::PathBuf>,

    /// Print the kernel programs' diagnostics at LEVEL and above on standard error (off, error,
    /// warn, info, debug, trace): sockets they could not read, unexpected families or states.
    /// For finding out why tcpclose misbehaves on some kernel; off, it costs nothing (the
    /// verifier removes the logging code) [default: RUST_LOG's level, else off].
    #[arg(long, value_name = "LEVEL", value_enum)]
    pub log_level: Option<LogLevel>,

    /// Which kernel programs trace: btf (typed programs: tp_btf on the tracepoint, fentry on
    /// the timewait socket's functions; less kernel time per connection, and TIME_WAIT's start
    /// exact), raw (raw tracepoints, on every kernel tcpclose supports), or auto: btf where the
    /// kernel accepts it, else raw, with a note saying why. The summary says which ran.
    #[arg(
        long,
        value_name = "SET",
        value_enum,
        env = "TCPCLOSE_PROGRAMS",
        default_value_t = ProgramsArg::Auto
    )]
    pub programs: ProgramsArg,

    /// Ring buffer size in bytes (a power of two, at least one page). For tests.
    #[arg(long, hide = true, value_parser = parse_ring_bytes, default_value_t = DEFAULT_RING_BYTES)]
    pub ring_bytes: u32,
}

/// `--programs` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgramsArg {
    Auto,
    Btf,
    Raw,
}

impl From<ProgramsArg> for crate::tracer::ProgramChoice {
    fn from(arg: ProgramsArg) -> Self {
        match arg {
            ProgramsArg::Auto => Self::Auto,
            ProgramsArg::Btf => Self::Btf,
            ProgramsArg::Raw => Self::Raw,
        }
    }
}

/// `--log-level` values, as aya-log numbers them (`Level`: error 1 to trace 5; 0 is off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum LogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl LogLevel {
    /// The level RUST_LOG asks for, as `env_logger` reads it: its last directive that names a
    /// level alone, or `tcpclose=LEVEL`. Anything else: off.
    pub fn from_rust_log(value: &str) -> Self {
        use clap::ValueEnum as _;
        value
            .split(',')
            .filter_map(|directive| {
                let level = match directive.split_once('=') {
                    Some((target, level)) if target.trim() == "tcpclose" => level,
                    Some(_) => return None,
                    None => directive,
                };
                Self::from_str(level.trim(), true).ok()
            })
            .next_back()
            .unwrap_or(Self::Off)
    }
}

/// `--group-by` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupByArg {
    Lport,
    Rport,
    Comm,
    Container,
    Pod,
    Cgroup,
    Netns,
}

impl GroupByArg {
    pub fn name(self) -> &'static str {
        self.group_by().name()
    }

    pub fn group_by(self) -> crate::stats::GroupBy {
        use crate::stats::GroupBy;
        match self {
            Self::Lport => GroupBy::Lport,
            Self::Rport => GroupBy::Rport,
            Self::Comm => GroupBy::Comm,
            Self::Container => GroupBy::Container,
            Self::Pod => GroupBy::Pod,
            Self::Cgroup => GroupBy::Cgroup,
            Self::Netns => GroupBy::Netns,
        }
    }
}

/// One `--hung` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HungSetting {
    /// Every teardown state but TIME_WAIT; `None`: off.
    All(Option<u64>),
    One(Phase, Option<u64>),
}

fn parse_hung(s: &str) -> Result<HungSetting, String> {
    let threshold = |d: &str| -> Result<Option<u64>, String> {
        if d == "off" {
            return Ok(None);
        }
        let d = parse_duration(d)?;
        Ok(Some(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    };
    match s.split_once('=') {
        None => Ok(HungSetting::All(threshold(s)?)),
        Some((state, d)) => {
            let phase = Phase::ALL
                .into_iter()
                .find(|p| p.name().eq_ignore_ascii_case(state.trim()))
                .ok_or_else(|| {
                    let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
                    format!("unknown state `{state}`: one of {}", names.join(", "))
                })?;
            Ok(HungSetting::One(phase, threshold(d)?))
        }
    }
}

impl Cli {
    /// What the run does, resolved once.
    pub fn settings(&self) -> Settings {
        let mode = if self.events {
            Mode::Events
        } else {
            Mode::Teardowns(TeardownSettings {
                thresholds: self.hung_thresholds(),
                interval: self.interval,
                group_by: self.group_by.map(|g| (g.group_by(), g.name())),
                metrics: self.metrics,
                metrics_label: self
                    .metrics_label
                    .map(|by| (by, usize::from(self.metrics_label_top))),
            })
        };
        Settings {
            format: if self.json {
                Format::Json
            } else {
                Format::Text
            },
            mode,
            filter: self.kernel_filter(),
            ring_bytes: self.ring_bytes,
            btf: self.btf.clone(),
            kernel_log: self
                .log_level
                .or_else(|| {
                    std::env::var("RUST_LOG")
                        .ok()
                        .map(|v| LogLevel::from_rust_log(&v))
                })
                .unwrap_or(LogLevel::Off) as u8,
            duration: self.duration,
            max_sockets: self.max_sockets,
            pids: self.pids.clone(),
            programs: self.programs.into(),
        }
    }

    /// The hung thresholds: the defaults, changed by each `--hung` in order.
    pub fn hung_thresholds(&self) -> Thresholds {
        let mut t = Thresholds::DEFAULT;
        for setting in &self.hung {
            match *setting {
                HungSetting::All(ns) => {
                    for phase in Phase::ALL {
                        if phase != Phase::TimeWait {
                            t.set(phase, ns);
                        }
                    }
                    if ns.is_none() {
                        t.set(Phase::TimeWait, None);
                    }
                }
                HungSetting::One(phase, ns) => t.set(phase, ns),
            }
        }
        t
    }

    pub fn kernel_filter(&self) -> KernelFilter {
        KernelFilter {
            ipv4_only: self.ipv4,
            ipv6_only: self.ipv6,
            ports: self.ports.clone(),
            local_ports: self.local_ports.clone(),
            remote_ports: self.remote_ports.clone(),
            // Only the transition stream and the metrics (transitions_total, the sockets per
            // state) read them.
            skip_established: !self.events && self.metrics.is_none(),
            netns: self.netns.clone(),
            cgroups: self.cgroups.clone(),
        }
    }
}

/// Parses `5s`, `500ms`, `2m`, `1h30m`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let hint = "expected a duration with a unit, e.g. 5s, 500ms, 2m";
    let parsed: jiff::SignedDuration = s.trim().parse().map_err(|_| hint.to_string())?;
    if !parsed.is_positive() {
        return Err(format!("the duration must be positive ({hint})"));
    }
    Duration::try_from(parsed).map_err(|_| hint.to_string())
}

/// A TCP port a connection can have: 1 to 65535 (port 0 only means "any" to `bind()`).
fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) => Err("port 0 is no connection's port: give 1 to 65535".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("`{s}` is not a port number (1 to 65535)")),
    }
}

/// A cgroup2 directory, as its id.
fn parse_cgroup(s: &str) -> Result<u64, String> {
    crate::cgroups::cgroup_id(s).map_err(|err| format!("{err:#}"))
}

/// A network namespace: an inode number, or a namespace file whose inode is taken.
fn parse_netns(s: &str) -> Result<u32, String> {
    if let Ok(inode) = s.parse::<u32>() {
        return match inode {
            0 => Err("0 is no namespace's inode".into()),
            inode => Ok(inode),
        };
    }
    crate::system::network_namespace_inode(std::path::Path::new(s)).ok_or_else(|| {
        format!(
            "`{s}` is neither a namespace inode number nor a network namespace file \
             (/proc/PID/ns/net, /run/netns/NAME)"
        )
    })
}

/// A process id: 1 or more.
fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) | Err(_) => Err(format!("`{s}` is not a process id (1 or more)")),
        Ok(pid) => Ok(pid),
    }
}

/// At least one socket: a table that follows nothing would report nothing.
fn parse_max_sockets(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (it bounds the sockets followed at once)".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a number of sockets")),
    }
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err("must be a power of two and at least 4096".into());
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn ports_and_table_sizes_that_mean_nothing_are_refused() {
        for args in [
            &["tcpclose", "--port", "0"][..],
            &["tcpclose", "--lport", "0"],
            &["tcpclose", "--rport", "0"],
            &["tcpclose", "--port", "65536"],
            &["tcpclose", "--max-sockets", "0"],
            &["tcpclose", "--max-sockets", "many"],
        ] {
            let err = Cli::try_parse_from(args).expect_err(&format!("{args:?}"));
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
        }
        let cli = Cli::try_parse_from(["tcpclose", "--port", "1", "--max-sockets", "1"]).unwrap();
        assert_eq!((cli.ports.as_slice(), cli.max_sockets), (&[1u16][..], 1));
    }

    #[test]
    fn the_kernel_log_level_comes_from_the_option_or_rust_log() {
        assert_eq!(LogLevel::from_rust_log("debug"), LogLevel::Debug);
        assert_eq!(LogLevel::from_rust_log("TRACE"), LogLevel::Trace);
        assert_eq!(
            LogLevel::from_rust_log("info,tcpclose=warn"),
            LogLevel::Warn
        );
        assert_eq!(LogLevel::from_rust_log("aya=debug"), LogLevel::Off);
        assert_eq!(LogLevel::from_rust_log("nonsense"), LogLevel::Off);
        let cli = Cli::try_parse_from(["tcpclose", "--log-level", "debug"]).unwrap();
        assert_eq!(cli.settings().kernel_log, 4);
        assert!(Cli::try_parse_from(["tcpclose", "--log-level", "loud"]).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn hung_thresholds() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["tcpclose"], args].concat()).map(|c| c.hung_thresholds())
        };
        assert_eq!(parse(&[]).unwrap(), Thresholds::DEFAULT);
        let t = parse(&[
            "--hung",
            "2s",
            "--hung",
            "close_wait=500ms",
            "--hung",
            "TIME_WAIT=70s",
        ])
        .unwrap();
        assert_eq!(t.get(Phase::FinWait1), Some(2_000_000_000));
        assert_eq!(t.get(Phase::CloseWait), Some(500_000_000));
        assert_eq!(t.get(Phase::TimeWait), Some(70_000_000_000));
        let t = parse(&["--hung", "LAST_ACK=off"]).unwrap();
        assert_eq!(t.get(Phase::LastAck), None);
        assert_eq!(
            t.get(Phase::CloseWait),
            Thresholds::DEFAULT.get(Phase::CloseWait)
        );
        assert!(
            parse(&["--hung", "TIME_WAIT=1s", "--hung", "off"])
                .unwrap()
                .is_empty()
        );
        let err = parse(&["--hung", "ESTABLISHED=1s"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown state") && err.contains("CLOSE_WAIT"),
            "{err}"
        );
        assert!(parse(&["--hung", "CLOSE_WAIT=soon"]).is_err());
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_bytes("4096"), Ok(4096));
        assert!(parse_ring_bytes("4095").is_err());
        assert!(parse_ring_bytes("6000").is_err());
        assert!(parse_ring_bytes("x").is_err());
    }

    #[test]
    fn repeatable_filters() {
        let cli = Cli::try_parse_from([
            "tcpclose", "-p", "80", "--port", "443", "--lport", "22", "--rport", "5432", "-4",
        ])
        .unwrap();
        let f = cli.kernel_filter();
        assert_eq!(f.ports, vec![80, 443]);
        assert_eq!(f.local_ports, vec![22]);
        assert_eq!(f.remote_ports, vec![5432]);
        assert!(f.ipv4_only && !f.ipv6_only);
        assert!(Cli::try_parse_from(["tcpclose", "-4", "-6"]).is_err());
        assert!(Cli::try_parse_from(["tcpclose", "--port", "70000"]).is_err());
    }

    #[test]
    fn handshake_ends_are_read_only_for_the_stream_and_the_metrics() {
        let skips = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("tcpclose").chain(args.iter().copied()));
            cli.unwrap().kernel_filter().skip_established
        };
        assert!(skips(&[]));
        assert!(skips(&["--hung", "5s", "-i", "10s"]));
        assert!(!skips(&["--events"]));
        assert!(!skips(&["--metrics", "9100"]));
    }
}
