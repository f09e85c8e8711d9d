//! The kernel side of a run: loads and attaches the eBPF program, hands out ring buffer records,
//! reads the kernel counters, detaches.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use crate::{btf::Btf, kernel_layout, reset_reasons::ResetReasons};
use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, ProgramError, RawTracePoint},
};
use tcpclose_common::{
    AF_INET, AF_INET6, CAUSE_PROGRAMS, CGROUP_FILTER_MAP, CONFIG_GLOBAL, COUNTERS_MAP, Config,
    Counter, EVENTS_MAP, FILTER_ENTRIES, NETNS_FILTER_MAP, PORT_FILTER_MAP, PORT_LOCAL,
    PORT_REMOTE, SocketLayout, TIMER_PROGRAMS, TRANSITION_PROGRAM, TRANSITION_TRACEPOINT,
    TYPED_CAUSE_PROGRAMS, TYPED_TIMEWAIT_PROGRAMS, TYPED_TRANSITION_PROGRAM,
};
use tokio::io::unix::AsyncFd;

use crate::system::{self, PRIVILEGE_HINT};

/// The compiled kernel program, built from `tcpclose-ebpf` by this crate's build script.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpclose"));

/// What to trace, decided on the command line and enforced inside the kernel program.
#[derive(Clone, Debug, Default)]
pub struct KernelFilter {
    pub ipv4_only: bool,
    pub ipv6_only: bool,
    /// Ports that pass as either end.
    pub ports: Vec<u16>,
    pub local_ports: Vec<u16>,
    pub remote_ports: Vec<u16>,
    /// Leave the handshakes' ends (`-> ESTABLISHED`) in the kernel: set when nothing reads them.
    pub skip_established: bool,
    /// Network namespaces (inode numbers) whose sockets pass; all when empty.
    pub netns: Vec<u32>,
    /// cgroup2 cgroups (ids) whose sockets, and their descendants' sockets, pass; all when
    /// empty.
    pub cgroups: Vec<u64>,
}

impl KernelFilter {
    fn config(&self, ring_bytes: u32) -> Config {
        let family = match (self.ipv4_only, self.ipv6_only) {
            (true, false) => AF_INET,
            (false, true) => AF_INET6,
            _ => 0,
        };
        Config {
            // Wake the consumer early enough that a full ring stays unlikely even if its timer
            // is late: a quarter of the ring, at most 256 KiB.
            wakeup_bytes: u64::from(ring_bytes / 4).min(256 << 10),
            family,
            port_filter: u8::from(self.has_ports()),
            skip_established: u8::from(self.skip_established),
            netns_filter: u8::from(!self.netns.is_empty()),
            cgroup_filter: u8::from(!self.cgroups.is_empty()),
            _pad: [0; 2],
            layout: SocketLayout::default(),
        }
    }

    /// Whether a socket passes the filters, as the kernel programs decide it.
    pub fn admits(&self, family: crate::event::Family, local: u16, remote: u16) -> bool {
        use crate::event::Family;
        let family_ok = match family {
            Family::Ipv4 => !self.ipv6_only,
            Family::Ipv6 => !self.ipv4_only,
        };
        let ports_ok = !self.has_ports()
            || self.ports.contains(&local)
            || self.ports.contains(&remote)
            || self.local_ports.contains(&local)
            || self.remote_ports.contains(&remote);
        family_ok && ports_ok
    }

    fn has_ports(&self) -> bool {
        !(self.ports.is_empty() && self.local_ports.is_empty() && self.remote_ports.is_empty())
    }

    /// `(port, sides)` entries of the kernel's `PORT_FILTER` array.
    fn port_sides(&self) -> Vec<(u16, u8)> {
        let mut sides = std::collections::BTreeMap::<u16, u8>::new();
        for &p in &self.ports {
            *sides.entry(p).or_default() |= PORT_LOCAL | PORT_REMOTE;
        }
        for &p in &self.local_ports {
            *sides.entry(p).or_default() |= PORT_LOCAL;
        }
        for &p in &self.remote_ports {
            *sides.entry(p).or_default() |= PORT_REMOTE;
        }
        sides.into_iter().collect()
    }
}

/// Fills the filter set `map` with `keys` (given with `option`).
fn write_set<K: aya::Pod>(ebpf: &mut Ebpf, map: &str, keys: &[K], option: &str) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    if keys.len() > FILTER_ENTRIES as usize {
        anyhow::bail!(
            "{option} is given {} times; at most {FILTER_ENTRIES} are taken",
            keys.len()
        );
    }
    let mut set: HashMap<_, K, u8> = HashMap::try_from(
        ebpf.map_mut(map)
            .with_context(|| format!("the eBPF object has no {map} map"))?,
    )?;
    for key in keys {
        set.insert(key, 1, 0)
            .with_context(|| format!("writing the {option} filter"))?;
    }
    Ok(())
}

/// Which set of kernel programs to run (`--programs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgramChoice {
    /// Typed where the kernel accepts them (found by loading them), raw otherwise.
    #[default]
    Auto,
    /// Typed, or fail.
    Btf,
    /// Raw tracepoints.
    Raw,
}

/// The set of kernel programs that runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    /// Typed (BTF): `tp_btf` on the transition tracepoint, fentry on the timewait socket's
    /// functions.
    Btf,
    /// Raw tracepoints: the transition tracepoint and the `timer:` tracepoints.
    Raw,
}

impl Programs {
    /// As the summary record and the metrics name it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Btf => "btf",
            Self::Raw => "raw",
        }
    }
}

/// Counters kept by the kernel program, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub timewait_matched: u64,
    pub timewait_lost: u64,
    pub matched: u64,
    pub lost: u64,
    pub cause_matched: u64,
    pub cause_lost: u64,
}

pub struct Tracer {
    /// Holds the attached program; dropping it detaches and unloads.
    ebpf: Option<Ebpf>,
    ring: AsyncFd<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    /// The kernel's jiffy (ns) when timewait sockets are followed.
    timewait_jiffy_ns: Option<u64>,
    /// The programs' diagnostics (`--log-level`), when asked for.
    logger: Option<aya_log::EbpfLogger<KernelLog>>,
    programs: Programs,
    /// The names of the kernel's reset reasons, when the cause programs run.
    causes: Option<ResetReasons>,
}

/// Prints the kernel programs' diagnostics on standard error, one line each.
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        // The level is enforced in the kernel.
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        eprintln!(
            "tcpclose: kernel: {}: {}",
            record.level().as_str().to_ascii_lowercase(),
            record.args()
        );
    }

    fn flush(&self) {}
}

impl Tracer {
    /// Checks the host, loads the program with `filter` and a ring of `ring_bytes`, attaches it.
    /// With `follow_timewait`, also attaches the timer programs that follow timewait sockets
    /// (when this kernel allows it; a warning says why not otherwise).
    /// The kernel's types come from `btf_path` when given (for kernels without
    /// `/sys/kernel/btf/vmlinux`), else from the kernel itself.
    /// `kernel_log`: the level from which the programs' diagnostics are printed (0: off).
    /// `choice`: typed or raw programs (see [`ProgramChoice`]); with `Auto`, a note on standard
    /// error says why the typed ones did not load.
    pub fn attach(
        filter: &KernelFilter,
        ring_bytes: u32,
        follow_timewait: bool,
        btf_path: Option<&Path>,
        kernel_log: u8,
        choice: ProgramChoice,
    ) -> Result<Self> {
        system::check_kernel_version()?;
        system::check_privileges()?;
        system::raise_memlock_limit();

        // The raw timer programs need the address of the timers' function, which only
        // /proc/kallsyms gives (CAP_SYSLOG); the typed ones attach to it by name. Reading it is
        // the kernel's work (it formats every symbol: a tenth of a second here, seconds in an
        // emulated guest), so it happens beside the parsing of the BTF, on a thread.
        let timer_handler = (follow_timewait && choice != ProgramChoice::Btf).then(|| {
            std::thread::Builder::new()
                .name("tcpclose-kallsyms".into())
                .spawn(|| system::kernel_symbol("tw_timer_handler"))
        });
        let (btf_bytes, btf_source) = kernel_btf(btf_path)?;
        let btf = Btf::parse(&btf_bytes).with_context(|| {
            format!(
                "reading {}: it is not BTF this tcpclose can read (a kernel's BTF, such as \
                 /sys/kernel/btf/vmlinux or a file BTFHub publishes, is)",
                btf_source.display()
            )
        })?;
        kernel_layout::check_transition_tracepoint(&btf)?;
        let mut config = filter.config(ring_bytes);
        config.layout = kernel_layout::socket_layout(&btf)?;
        for warning in kernel_layout::add_placement_layout(&btf, &mut config.layout) {
            eprintln!(
                "tcpclose: warning: records carry no {} ({warning})",
                if warning.contains("cgroup") {
                    "cgroup"
                } else {
                    "network namespace"
                }
            );
        }
        if (!filter.netns.is_empty() && config.layout.net_ns_inum == 0)
            || (!filter.cgroups.is_empty() && config.layout.cgroup_kn == 0)
        {
            anyhow::bail!(
                "--netns and --cgroup need sockets' network namespace and cgroup, which this \
                 kernel's BTF does not describe (see the warning above)"
            );
        }
        // Where a timewait socket's fields are: both sets read them. The raw timer programs
        // also need the timer tracepoints and the timers' function.
        let timewait = if follow_timewait {
            kernel_layout::add_timewait_layout(&btf, &mut config.layout, 0)
        } else {
            Err(anyhow!("not asked to"))
        };
        let timer_handler = match timer_handler {
            None => Err(anyhow!("not needed with typed programs")),
            Some(Err(err)) => Err(anyhow!(err).context("starting a thread to read /proc/kallsyms")),
            Some(Ok(thread)) => thread
                .join()
                .map_err(|_| anyhow!("the thread reading /proc/kallsyms panicked"))
                .and_then(|address| address),
        };
        let raw_timewait = match &timewait {
            Ok(()) => kernel_layout::check_timer_tracepoints(&btf).and(timer_handler),
            Err(err) => Err(anyhow!("{err:#}")),
        };
        if let Ok(handler) = raw_timewait {
            config.layout.tw_timer_handler = handler;
        }
        // Resets and retransmitted FINs explain teardowns; a kernel without their tracepoints
        // still traces teardowns.
        let causes = kernel_layout::add_cause_layout(&btf, &mut config.layout);
        let causes = match causes {
            Ok(reasons) => Some(reasons),
            Err(err) => {
                eprintln!(
                    "tcpclose: warning: resets and retransmitted FINs will not be explained \
                     ({err:#})"
                );
                None
            }
        };
        drop(btf);
        // The programs need no relocation (they read at the offsets in `config`), but when the
        // types come from a file aya is given the same, rather than the missing sysfs file. The
        // typed programs are checked against these types by the kernel.
        let aya_btf = match btf_path {
            Some(_) => Some(
                aya::Btf::parse(&btf_bytes, aya::Endianness::default())
                    .with_context(|| format!("reading {}", btf_source.display()))?,
            ),
            None if choice != ProgramChoice::Raw => aya::Btf::from_sys_fs().ok(),
            None => None,
        };
        drop(btf_bytes);
        let mut loader = EbpfLoader::new();
        if btf_path.is_some() {
            loader.btf(aya_btf.as_ref());
        }
        let mut ebpf = loader
            .override_global(CONFIG_GLOBAL, &config, true)
            // A constant for the verifier: at 0 it removes the logging code.
            .override_global(aya_log::LEVEL, &kernel_log, false)
            .map_max_entries(EVENTS_MAP, ring_bytes)
            .load(PROGRAM_OBJECT)
            .map_err(explain_load_error)?;

        if filter.has_ports() {
            let mut ports: Array<_, u8> = Array::try_from(
                ebpf.map_mut(PORT_FILTER_MAP)
                    .context("the eBPF object has no port filter map")?,
            )?;
            for (port, sides) in filter.port_sides() {
                ports
                    .set(u32::from(port), sides, 0)
                    .context("writing the port filter")?;
            }
        }

        write_set(&mut ebpf, NETNS_FILTER_MAP, &filter.netns, "--netns")?;
        write_set(&mut ebpf, CGROUP_FILTER_MAP, &filter.cgroups, "--cgroup")?;

        let typed = match (choice, &aya_btf) {
            (ProgramChoice::Raw, _) => Err(anyhow!("not asked to")),
            (_, None) => Err(anyhow!("no kernel BTF for them")),
            (_, Some(btf)) => load_typed(&mut ebpf, btf, timewait.is_ok(), causes.is_some()),
        };
        let programs = match typed {
            Ok(()) => Programs::Btf,
            Err(err) if choice == ProgramChoice::Btf => {
                return Err(err.context(
                    "--programs btf: this kernel does not run tcpclose's typed programs (use \
                     --programs raw, or auto to fall back by itself)",
                ));
            }
            Err(err) => {
                if choice == ProgramChoice::Auto {
                    // The reason in one line: the verifier's log is for `--programs btf`.
                    eprintln!(
                        "tcpclose: note: raw tracepoint programs: {}",
                        err.root_cause()
                    );
                }
                Programs::Raw
            }
        };
        let timewait_ok = match programs {
            Programs::Btf => {
                attach_typed(&mut ebpf, timewait.is_ok(), causes.is_some())?;
                timewait
            }
            Programs::Raw => {
                attach_raw(&mut ebpf)?;
                if causes.is_some() {
                    attach_causes(&mut ebpf)?;
                }
                raw_timewait.map(|_| ())
            }
        };
        let timewait_jiffy_ns = match timewait_ok.and_then(|()| system::jiffy_ns()) {
            Err(_) if !follow_timewait => None,
            Ok(jiffy_ns) => {
                if programs == Programs::Raw {
                    attach_timers(&mut ebpf)?;
                }
                Some(jiffy_ns)
            }
            Err(err) => {
                eprintln!(
                    "tcpclose: warning: cannot follow timewait sockets ({err:#}); the orphaned \
                     FIN_WAIT2 and TIME_WAIT phases will be missing from teardown records"
                );
                None
            }
        };

        let logger = if kernel_log > 0 {
            Some(
                aya_log::EbpfLogger::init_with_logger(&mut ebpf, KernelLog)
                    .context("reading the kernel programs' diagnostics")?,
            )
        } else {
            None
        };
        let ring = RingBuf::try_from(
            ebpf.take_map(EVENTS_MAP)
                .context("the eBPF object has no event ring buffer")?,
        )?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(COUNTERS_MAP)
                .context("the eBPF object has no counters map")?,
        )?;
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, until dropped,
        // and the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|err| err.into_parts().1)
            .context("registering the ring buffer with the event loop")?;
        Ok(Self {
            ebpf: Some(ebpf),
            ring,
            counters,
            timewait_jiffy_ns,
            logger,
            programs,
            causes,
        })
    }

    /// When the cause programs run (resets and retransmitted FINs are reported): the names of
    /// this kernel's reasons for the resets it sends (none before Linux 6.10).
    pub fn reset_reasons(&self) -> Option<&ResetReasons> {
        self.causes.as_ref()
    }

    /// Which set of kernel programs runs.
    pub fn programs(&self) -> Programs {
        self.programs
    }

    /// Prints the kernel programs' diagnostics waiting, when they are asked for.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// The kernel's jiffy in ns, when timewait sockets are followed.
    pub fn timewait_jiffy_ns(&self) -> Option<u64> {
        self.timewait_jiffy_ns
    }

    /// Waits until the kernel program forces a wakeup (a backlog is building up). The program
    /// never wakes the consumer for single records: callers also drain on a timer.
    pub async fn backlog(&self) -> io::Result<()> {
        let mut guard = self.ring.readable().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Hands at most `max` records to `each`; returns how many it handed.
    pub fn drain(&mut self, max: usize, mut each: impl FnMut(&[u8])) -> usize {
        let ring = self.ring.get_mut();
        let mut n = 0;
        while n < max {
            let Some(item) = ring.next() else { break };
            each(&item);
            n += 1;
        }
        n
    }

    /// Detaches and unloads the program. Records already in the ring stay readable.
    pub fn detach(&mut self) {
        self.ebpf = None;
    }

    /// Tracepoint hits the kernel did not hand to tcpclose's programs because one was already
    /// running on that CPU (an interrupt's softirq changed a socket's state while the program ran
    /// in process context): BPF's recursion protection skips the nested run (`__bpf_trace_run()`)
    /// and counts it as the program's `recursion_misses`. 0 once detached.
    pub fn missed(&self) -> Result<u64> {
        let Some(ebpf) = &self.ebpf else {
            return Ok(0);
        };
        let mut missed = 0;
        for (name, program) in ebpf.programs() {
            let Ok(fd) = program.fd() else {
                // Not loaded (timewait sockets not followed).
                continue;
            };
            let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
            let info = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {path} (program {name})"))?;
            missed += recursion_misses(&info).unwrap_or(0);
        }
        Ok(missed)
    }

    pub fn counters(&self) -> Result<KernelCounters> {
        let sum = |counter: Counter| -> Result<u64> {
            let values = self
                .counters
                .get(&(counter as u32), 0)
                .context("reading the kernel counters")?;
            Ok(values.iter().sum())
        };
        Ok(KernelCounters {
            matched: sum(Counter::Matched)?,
            lost: sum(Counter::Lost)?,
            timewait_matched: sum(Counter::TimewaitMatched)?,
            timewait_lost: sum(Counter::TimewaitLost)?,
            cause_matched: sum(Counter::CauseMatched)?,
            cause_lost: sum(Counter::CauseLost)?,
        })
    }
}

/// The `recursion_misses` line of a BPF program's fdinfo (`bpf_prog_show_fdinfo()`).
fn recursion_misses(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("recursion_misses:"))
        .and_then(|value| value.trim().parse().ok())
}

/// Where the running kernel describes its own types (CONFIG_DEBUG_INFO_BTF).
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's BTF, where the programs' offsets come from, and where it was read.
fn kernel_btf(path: Option<&Path>) -> Result<(Vec<u8>, PathBuf)> {
    match path {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading the BTF file {} (--btf)", path.display()))?;
            Ok((bytes, path.to_path_buf()))
        }
        None => {
            let bytes = std::fs::read(VMLINUX_BTF).with_context(|| {
                format!(
                    "reading {VMLINUX_BTF}: tcpclose reads sockets at the offsets the kernel \
                     describes there, which needs a kernel built with CONFIG_DEBUG_INFO_BTF \
                     (every major distribution's since about 2020 is); for an older kernel, \
                     give its BTF with --btf PATH (BTFHub publishes one for most distribution \
                     kernels)"
                )
            })?;
            Ok((bytes, PathBuf::from(VMLINUX_BTF)))
        }
    }
}

/// Whether the kernel said EPERM somewhere in `err`'s chain. (EACCES is not a privilege problem
/// here: it is how the verifier rejects a program.)
fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether `name` is a typed program on a tracepoint (`tp_btf`), rather than fentry.
fn is_btf_tracepoint(name: &str) -> bool {
    name == TYPED_TRANSITION_PROGRAM || TYPED_CAUSE_PROGRAMS.iter().any(|(p, _, _)| *p == name)
}

/// Loads the typed programs (the transition program, the timewait ones when `timewait`, the
/// cause ones when `causes`), without attaching them: whether the kernel accepts them is known only from loading. On the
/// first refusal, unloads those it loaded and says which one the kernel refused, and why.
fn load_typed(ebpf: &mut Ebpf, btf: &aya::Btf, timewait: bool, causes: bool) -> Result<()> {
    let mut loaded: Vec<&str> = Vec::new();
    let mut load = |ebpf: &mut Ebpf, name: &'static str, function: &str| -> Result<()> {
        let program = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no {name} program"))?;
        let result = if is_btf_tracepoint(name) {
            let program: &mut BtfTracePoint = program.try_into()?;
            program.load(function, btf)
        } else {
            let program: &mut FEntry = program.try_into()?;
            program.load(function, btf)
        };
        result.map_err(|err| {
            let why = anyhow!("{}", refusal(&err, function));
            match err {
                // The verifier's reasons, for `--programs btf` (the note of `auto` shows the
                // first line only).
                ProgramError::LoadError { verifier_log, .. }
                    if !verifier_log.to_string().is_empty() =>
                {
                    why.context(format!("the verifier said:\n{}", log_tail(&verifier_log)))
                }
                _ => why,
            }
        })?;
        loaded.push(name);
        Ok(())
    };
    let mut result = load(ebpf, TYPED_TRANSITION_PROGRAM, TRANSITION_TRACEPOINT);
    if timewait {
        for (name, function) in TYPED_TIMEWAIT_PROGRAMS {
            result = result.and_then(|()| load(ebpf, name, function));
        }
    }
    if causes {
        for (name, tracepoint, _) in TYPED_CAUSE_PROGRAMS {
            result = result.and_then(|()| load(ebpf, name, tracepoint));
        }
    }
    if result.is_err() {
        for name in loaded {
            let Some(program) = ebpf.program_mut(name) else {
                continue;
            };
            // Whatever fails here leaves a loaded program unattached until exit: harmless.
            if is_btf_tracepoint(name) {
                if let Ok(program) = <&mut BtfTracePoint>::try_from(program) {
                    let _ = program.unload();
                }
            } else if let Ok(program) = <&mut FEntry>::try_from(program) {
                let _ = program.unload();
            }
        }
    }
    result
}

/// The end of a verifier log, where its reason is.
fn log_tail(log: &impl std::fmt::Display) -> String {
    let text = log.to_string();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Why the kernel refused a typed program for `function`, in a few words (no error code
/// dump: with `--programs auto` this is a note, not an error).
fn refusal(err: &ProgramError, function: &str) -> String {
    if is_permission_error(err) {
        return "this kernel refuses typed BTF programs (tp_btf, fentry)".to_owned();
    }
    match err {
        ProgramError::LoadError { io_error, .. } => {
            format!("the kernel refused the typed program on {function} ({io_error})")
        }
        ProgramError::Btf(_) => format!("{function} is not in this kernel's BTF"),
        other => format!("the typed program on {function}: {other}"),
    }
}

/// Attaches the typed programs [`load_typed`] loaded.
fn attach_typed(ebpf: &mut Ebpf, timewait: bool, causes: bool) -> Result<()> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(TYPED_TRANSITION_PROGRAM)
        .context("the eBPF object has no typed transition program")?
        .try_into()?;
    program
        .attach()
        .map_err(explain_program_error)
        .context("attaching to the sock:inet_sock_set_state tracepoint (tp_btf)")?;
    if timewait {
        for (name, function) in TYPED_TIMEWAIT_PROGRAMS {
            let program: &mut FEntry = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no {name} program"))?
                .try_into()?;
            program
                .attach()
                .map_err(explain_program_error)
                .with_context(|| format!("attaching to {function} (fentry)"))?;
        }
    }
    if causes {
        for (name, tracepoint, _) in TYPED_CAUSE_PROGRAMS {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no {name} program"))?
                .try_into()?;
            program
                .attach()
                .map_err(explain_program_error)
                .with_context(|| {
                    format!("attaching to the tcp:{tracepoint} tracepoint (tp_btf)")
                })?;
        }
    }
    Ok(())
}

/// Loads and attaches the raw transition program.
fn attach_raw(ebpf: &mut Ebpf) -> Result<()> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(TRANSITION_PROGRAM)
        .context("the eBPF object has no inet_sock_set_state program")?
        .try_into()?;
    program.load().map_err(explain_program_error)?;
    program
        .attach(TRANSITION_TRACEPOINT)
        .map_err(explain_program_error)
        .context("attaching to the sock:inet_sock_set_state tracepoint")?;
    Ok(())
}

/// Loads and attaches the raw cause programs.
fn attach_causes(ebpf: &mut Ebpf) -> Result<()> {
    for (name, event, _) in CAUSE_PROGRAMS {
        attach_raw_tracepoint(ebpf, name, "tcp", event)?;
    }
    Ok(())
}

/// Loads and attaches the raw timer programs.
fn attach_timers(ebpf: &mut Ebpf) -> Result<()> {
    for (name, event) in TIMER_PROGRAMS {
        attach_raw_tracepoint(ebpf, name, "timer", event)?;
    }
    Ok(())
}

/// Loads program `name` and attaches it to the raw tracepoint `category:event`.
fn attach_raw_tracepoint(ebpf: &mut Ebpf, name: &str, category: &str, event: &str) -> Result<()> {
    let program: &mut RawTracePoint = ebpf
        .program_mut(name)
        .with_context(|| format!("the eBPF object has no {name} program"))?
        .try_into()?;
    program.load().map_err(explain_program_error)?;
    program
        .attach(event)
        .map_err(explain_program_error)
        .with_context(|| format!("attaching to the {category}:{event} tracepoint"))?;
    Ok(())
}

fn explain_load_error(err: EbpfError) -> anyhow::Error {
    if is_permission_error(&err) {
        return anyhow!("{PRIVILEGE_HINT} (the kernel refused: {err})");
    }
    if let EbpfError::MapError(MapError::CreateError { name, io_error }) = &err
        && name == EVENTS_MAP
        && io_error.raw_os_error() == Some(libc::EINVAL)
    {
        return anyhow!(
            "the kernel refused to create the BPF ring buffer ({io_error}): tcpclose needs \
             Linux 5.8 or newer with BPF ring buffer support"
        );
    }
    anyhow::Error::new(err).context("loading tcpclose's eBPF object")
}

fn explain_program_error(err: ProgramError) -> anyhow::Error {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &err
        && io_error.raw_os_error() != Some(libc::EPERM)
    {
        return anyhow!(
            "the kernel's verifier rejected tcpclose's program ({io_error}); \
             please report this with the kernel version and this log:\n{verifier_log}"
        );
    }
    if is_permission_error(&err) {
        return anyhow!("{PRIVILEGE_HINT} (the kernel refused: {err})");
    }
    anyhow::Error::new(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map, program and global the loader looks up by name (from tcpclose-common, the one
    /// source of each name) is in the eBPF object that the build script made.
    #[test]
    fn the_object_has_what_the_loader_looks_up() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
        let elf = object::File::parse(PROGRAM_OBJECT).expect("the eBPF object is an ELF file");
        let in_section = |name: &str, section: &str| {
            elf.symbols().any(|symbol| {
                symbol.name() == Ok(name)
                    && symbol
                        .section_index()
                        .and_then(|i| elf.section_by_index(i).ok())
                        .is_some_and(|s| s.name() == Ok(section))
            })
        };
        for map in [
            EVENTS_MAP,
            COUNTERS_MAP,
            PORT_FILTER_MAP,
            NETNS_FILTER_MAP,
            CGROUP_FILTER_MAP,
        ] {
            assert!(in_section(map, "maps"), "no map {map}");
        }
        assert!(
            in_section(CONFIG_GLOBAL, ".rodata"),
            "no global {CONFIG_GLOBAL}"
        );
        // Each program on the raw tracepoint the loader attaches it to (aya's section names).
        let tracepoint = format!("raw_tp/{TRANSITION_TRACEPOINT}");
        assert!(
            in_section(TRANSITION_PROGRAM, &tracepoint),
            "no program {TRANSITION_PROGRAM} in {tracepoint}"
        );
        for (program, event) in TIMER_PROGRAMS {
            let tracepoint = format!("raw_tp/{event}");
            assert!(
                in_section(program, &tracepoint),
                "no program {program} in {tracepoint}"
            );
        }
        // The typed set: the kernel function each attaches to is in its section's name.
        let tp_btf = format!("tp_btf/{TRANSITION_TRACEPOINT}");
        assert!(
            in_section(TYPED_TRANSITION_PROGRAM, &tp_btf),
            "no program {TYPED_TRANSITION_PROGRAM} in {tp_btf}"
        );
        for (program, function) in TYPED_TIMEWAIT_PROGRAMS {
            let section = format!("fentry/{function}");
            assert!(
                in_section(program, &section),
                "no program {program} in {section}"
            );
        }
        for ((raw, event, _), (typed, typed_event, _)) in
            CAUSE_PROGRAMS.into_iter().zip(TYPED_CAUSE_PROGRAMS)
        {
            assert_eq!(event, typed_event);
            for (program, section) in [
                (raw, format!("raw_tp/{event}")),
                (typed, format!("tp_btf/{event}")),
            ] {
                assert!(
                    in_section(program, &section),
                    "no program {program} in {section}"
                );
            }
        }
    }

    #[test]
    fn reads_recursion_misses_from_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t17\nrun_cnt:\t0\n\
                    recursion_misses:\t14\nverified_insns:\t180\n";
        assert_eq!(recursion_misses(info), Some(14));
        assert_eq!(recursion_misses("prog_type:\t17\n"), None);
    }

    #[test]
    fn port_filter_sides_merge() {
        let f = KernelFilter {
            ports: vec![80],
            local_ports: vec![443, 80],
            remote_ports: vec![443, 5432],
            ..KernelFilter::default()
        };
        assert_eq!(
            f.port_sides(),
            vec![
                (80, PORT_LOCAL | PORT_REMOTE),
                (443, PORT_LOCAL | PORT_REMOTE),
                (5432, PORT_REMOTE)
            ]
        );
        assert_eq!(f.config(1 << 20).port_filter, 1);
        assert_eq!(KernelFilter::default().config(1 << 20).port_filter, 0);
    }

    #[test]
    fn family_and_wakeup_config() {
        let v4 = KernelFilter {
            ipv4_only: true,
            ..KernelFilter::default()
        };
        assert_eq!(v4.config(4096).family, AF_INET);
        assert_eq!(v4.config(4096).wakeup_bytes, 1024);
        assert_eq!(v4.config(8 << 20).wakeup_bytes, 256 << 10);
        let v6 = KernelFilter {
            ipv6_only: true,
            ..KernelFilter::default()
        };
        assert_eq!(v6.config(4096).family, AF_INET6);
        assert_eq!(KernelFilter::default().config(4096).family, 0);
        assert_eq!(KernelFilter::default().config(4096).skip_established, 0);
        let skip = KernelFilter {
            skip_established: true,
            ..KernelFilter::default()
        };
        assert_eq!(skip.config(4096).skip_established, 1);
    }
}
