//! Checks of the host before loading anything, each failing with an error that says what to do:
//! privileges and kernel version; kernel symbols and the jiffy; capabilities dropped after
//! attaching.

use std::{fs, io};

use anyhow::{Context as _, Result, bail};

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The message for every privilege failure, wherever it is detected.
pub const PRIVILEGE_HINT: &str = "tcpclose needs privileges to load its eBPF program: run it as root \
     (e.g. with sudo), or give it the capabilities CAP_BPF and CAP_PERFMON \
     (e.g. `setcap cap_bpf,cap_perfmon+ep tcpclose`)";

/// Returns an error unless the effective capabilities (`CapEff` in /proc/self/status) allow
/// loading BPF tracing programs: CAP_BPF and CAP_PERFMON (Linux 5.8+), or CAP_SYS_ADMIN.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let caps = effective_caps(&status).context("no CapEff line in /proc/self/status")?;
    if has_tracing_caps(caps) {
        Ok(())
    } else {
        bail!("{PRIVILEGE_HINT}")
    }
}

fn effective_caps(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn has_tracing_caps(caps: u64) -> bool {
    let has = |cap: u32| caps & (1 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Ring buffers (`BPF_MAP_TYPE_RINGBUF`) arrived in Linux 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// Returns an error if the running kernel is older than [`MIN_KERNEL`].
pub fn check_kernel_version() -> Result<()> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    check_release(release.trim())
}

fn check_release(release: &str) -> Result<()> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        // An unparseable release string proves nothing; the load itself will tell.
        return Ok(());
    };
    if (major, minor) < MIN_KERNEL {
        bail!(
            "kernel {release} is too old: tcpclose needs Linux {}.{} or newer (BPF ring buffers)",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    Ok(())
}

/// Address of a kernel text symbol, from `/proc/kallsyms`. Addresses read as 0 when
/// `kernel.kptr_restrict` hides them from this process.
pub fn kernel_symbol(name: &str) -> Result<u64> {
    let kallsyms = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
    let address = symbol_address(&kallsyms, name)
        .with_context(|| format!("the kernel has no symbol {name} in /proc/kallsyms"))?;
    if address == 0 {
        bail!(
            "/proc/kallsyms hides kernel addresses from tcpclose (kernel.kptr_restrict): \
             run it as root, or set `sysctl kernel.kptr_restrict=0`"
        );
    }
    Ok(address)
}

/// Finds `name` among the `<address> <type> <name> [module]` lines of kallsyms.
fn symbol_address(kallsyms: &str, name: &str) -> Option<u64> {
    kallsyms.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let address = parts.next()?;
        let _kind = parts.next()?;
        (parts.next()? == name).then(|| u64::from_str_radix(address, 16).ok())?
    })
}

/// The kernel's jiffy in ns (TICK_NSEC, 1 s / CONFIG_HZ): the resolution of the coarse clocks,
/// which `posix_get_coarse_res()` reports as `KTIME_LOW_RES`, one tick. No privilege needed, no
/// measurement.
pub fn jiffy_ns() -> Result<u64> {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `res` is a valid, writable timespec.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } != 0 {
        return Err(io::Error::last_os_error()).context("clock_getres(CLOCK_MONOTONIC_COARSE)");
    }
    jiffy_from(res.tv_sec, res.tv_nsec).with_context(|| {
        format!(
            "the coarse clock's resolution ({}s {}ns) is no jiffy",
            res.tv_sec, res.tv_nsec
        )
    })
}

/// A jiffy from a coarse clock resolution: HZ is between 24 and 1200 on every architecture.
fn jiffy_from(sec: i64, nsec: i64) -> Option<u64> {
    let ns = u64::try_from(sec).ok()?.checked_mul(1_000_000_000)? + u64::try_from(nsec).ok()?;
    (800_000..=42_000_000).contains(&ns).then_some(ns)
}

/// Capabilities still useful once the programs are attached: reading other processes'
/// `/proc/PID/fd` (CAP_DAC_READ_SEARCH to list, CAP_SYS_PTRACE to read the links) and entering
/// other network namespaces (CAP_SYS_ADMIN, for `setns`), both for naming the owners of hung
/// sockets. The ring buffer and the maps are read through file descriptors already open, which
/// needs no capability; detaching is closing them.
const KEPT_AFTER_ATTACH: [u32; 3] = [CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN];

/// Drops every capability but [`KEPT_AFTER_ATTACH`] from the effective, permitted and
/// inheritable sets (for good: permitted ones cannot come back), and the ambient set.
pub fn drop_capabilities() -> Result<()> {
    // struct __user_cap_header_struct and __user_cap_data_struct, _LINUX_CAPABILITY_VERSION_3.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header fills two data structs.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("reading this process's capabilities");
    }
    let mut keep = [0u32; 2];
    for cap in KEPT_AFTER_ATTACH {
        keep[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    for (d, k) in data.iter_mut().zip(keep) {
        d.effective &= k;
        d.permitted &= k;
        d.inheritable = 0;
    }
    // SAFETY: capset with a v3 header reads two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("dropping capabilities after attaching");
    }
    // SAFETY: prctl without pointers. Fails only on kernels without ambient capabilities (<4.3).
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF maps to it (before 5.11); newer
/// kernels account BPF memory to the memory cgroup and ignore it.
/// The inode of the network namespace file at `path` (`/proc/PID/ns/net`, `/run/netns/NAME`):
/// opened, such a file is the namespace itself, which `/proc/self/fd` names `net:[INODE]`.
/// `None` when it is no network namespace.
pub fn network_namespace_inode(path: &std::path::Path) -> Option<u32> {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    /// `NS_GET_NSTYPE` (linux/nsfs.h): the namespace type of an nsfs file, since 4.11.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    let file = std::fs::File::open(path).ok()?;
    // A namespace file answers with its type; any other file fails (ENOTTY). `/run/netns/NAME`
    // is a bind mount of one, so its link in /proc/self/fd names the mount, not `net:[N]`:
    // the ioctl tells them apart wherever the file is mounted.
    // SAFETY: the fd is open for the call's duration; this ioctl takes no argument.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return None;
    }
    u32::try_from(file.metadata().ok()?.ino()).ok()
}

pub fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to a rlimit. Failure is fine: the map creation error will say more.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_namespace_files_are_told_from_other_files() {
        use std::os::unix::fs::MetadataExt as _;
        let ours = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(
            network_namespace_inode(std::path::Path::new("/proc/self/ns/net")).map(u64::from),
            Some(ours)
        );
        assert_eq!(
            network_namespace_inode(std::path::Path::new("/proc/self/ns/uts")),
            None
        );
        assert_eq!(
            network_namespace_inode(std::path::Path::new("/etc/hostname")),
            None
        );
        assert_eq!(
            network_namespace_inode(std::path::Path::new("/no/such")),
            None
        );
    }

    #[test]
    fn finds_kernel_symbols() {
        let kallsyms = "ffffffff82006060 t inet_twsk_kill\nffffffff82006070 t tw_timer_handler\n\
                        ffffffffc0001000 t tw_timer_handler_x [mod]\n";
        assert_eq!(
            symbol_address(kallsyms, "tw_timer_handler"),
            Some(0xffffffff82006070)
        );
        assert_eq!(symbol_address(kallsyms, "tw_timer"), None);
        assert_eq!(
            symbol_address("0000000000000000 t tw_timer_handler", "tw_timer_handler"),
            Some(0)
        );
    }

    #[test]
    fn jiffies_from_the_coarse_clock() {
        assert_eq!(jiffy_from(0, 4_000_000), Some(4_000_000));
        assert_eq!(jiffy_from(0, 1_000_000), Some(1_000_000));
        assert_eq!(jiffy_from(0, 3_333_333), Some(3_333_333));
        assert_eq!(
            jiffy_from(0, 1),
            None,
            "a high-resolution clock, not a tick"
        );
        assert_eq!(jiffy_from(1, 0), None);
        assert_eq!(jiffy_from(-1, 0), None);
        // This machine's.
        let jiffy = jiffy_ns().unwrap();
        assert!((800_000..=42_000_000).contains(&jiffy), "{jiffy}");
    }

    #[test]
    fn kernel_version_gate() {
        check_release("6.18.44-fc-v595").unwrap();
        check_release("5.8.0").unwrap();
        check_release("5.10.0-28-amd64").unwrap();
        let err = check_release("5.7.19").unwrap_err().to_string();
        assert!(err.contains("too old") && err.contains("5.8"), "{err}");
        assert!(check_release("4.15.0-generic").is_err());
        // Unknown formats are left to the load to judge.
        check_release("weird").unwrap();
    }

    #[test]
    fn capability_sets() {
        let status = "Name:\ttcpclose\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(status), Some(0x1ff_ffff_ffff));
        assert!(has_tracing_caps(0x1ff_ffff_ffff));
        assert!(!has_tracing_caps(0));
        assert!(has_tracing_caps(1 << CAP_SYS_ADMIN));
        assert!(has_tracing_caps((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!has_tracing_caps(1 << CAP_BPF));
    }
}
