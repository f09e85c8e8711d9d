//! Helpers for the integration tests: run the real `tcpclose` binary, make real sockets, read what
//! it printed.
//!
//! These tests need root and a kernel that can load the program. They never skip: a machine that
//! cannot run them fails them, with the reason.
//!
//! `cargo xtask` (the bench, the soak) uses this library too, for what it shares with the tests:
//! network namespaces ([`netns::Netns`]), the connection churn ([`churn`]), running a tracer
//! ([`tracer`]), waiting on a child under a deadline. So it depends on nothing that needs the
//! eBPF toolchain to build (not on the `tcpclose` crate), and its helpers that xtask calls return
//! errors rather than panic.

use std::{
    io::{self, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::RwLock,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod cgroup;
pub mod churn;
pub mod netns;
pub mod prometheus;
pub mod timing;
pub mod tracer;

pub use churn::churn;
pub use tracer::{Run, Tracer, Tracing};

/// The teardown states, as tcpclose names them: the phases a teardown record times (`phases`),
/// and the `phase` and hung `state` labels of its metrics.
pub const PHASES: [&str; 6] = [
    "FIN_WAIT1",
    "FIN_WAIT2",
    "CLOSING",
    "TIME_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
];

/// The binary under test: `$TCPCLOSE_BIN` (set by `cargo xtask test`), else the release build.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("TCPCLOSE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tcpclose")
        });
    assert!(
        path.is_file(),
        "{} does not exist: run the tests with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and must run as root"
    );
}

/// Waits for `child` to exit for up to `timeout`. If it has not, kills it, reaps it and returns
/// `None`: every wait on a child in these tests has a deadline, so that a stuck child is a
/// failure, never a hung test run.
pub fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Waits for `child`, whose output is piped, for up to `timeout`, reading its output meanwhile;
/// panics, naming `what`, if it has not exited by then (it is killed).
pub fn output_with_deadline(what: &str, child: Child, timeout: Duration) -> Output {
    let (status, stdout, stderr) = collect_output(child, timeout);
    let Some(status) = status else {
        panic!(
            "{what} did not exit within {timeout:?} (killed); it printed:\n{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Waits for `child` for up to `timeout`, reading its piped output meanwhile: its exit status
/// (`None`: killed at the deadline, see [`wait_with_deadline`]) and what it printed.
fn collect_output(mut child: Child, timeout: Duration) -> (Option<ExitStatus>, Vec<u8>, Vec<u8>) {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let status = wait_with_deadline(&mut child, timeout);
    (
        status,
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    )
}

/// A child killed and reaped on drop.
pub struct Kid(pub std::process::Child);

impl Kid {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = wait_with_deadline(&mut self.0, Duration::from_secs(10));
    }
}

/// A directory of the test's own under the system's temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, empty directory named after `tag`, this process and a counter; panics if it
    /// cannot be made.
    pub fn new(tag: &str) -> Self {
        Self::create(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`TempDir::new`], failing with an error rather than a panic.
    pub fn create(tag: &str) -> io::Result<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tcpclose-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {dir:?}: {e}")))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `SO_RCVTIMEO`: a blocking `accept()` or read on `socket` gives up after `timeout`.
pub fn set_receive_timeout(socket: &impl std::os::fd::AsFd, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and an option value of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
}

/// The record is about the socket `local -> remote`.
pub fn about(r: &Value, (local, remote): (std::net::SocketAddr, std::net::SocketAddr)) -> bool {
    r["laddr"] == local.ip().to_string().as_str()
        && r["lport"] == local.port()
        && r["raddr"] == remote.ip().to_string().as_str()
        && r["rport"] == remote.port()
}

/// `OLD->NEW` of a transition record.
pub fn arrow(t: &Value) -> String {
    format!(
        "{}->{}",
        t["old"].as_str().unwrap_or("?"),
        t["new"].as_str().unwrap_or("?")
    )
}

/// The calling thread's `comm`, as the kernel reports it.
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .expect("reading /proc/thread-self/comm")
        .trim_end()
        .to_owned()
}

/// Runs `cmd` (the binary, or wrappers that exec it) to completion, for up to a minute.
pub fn run_binary(cmd: &mut Command) -> (ExitStatus, String, String) {
    let child = spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let out = output_with_deadline(&format!("{cmd:?}"), child, Duration::from_secs(60));
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP socket bound to `ip` on a free port, not yet listening: lets a test learn its port,
/// start a tracer filtering on it, and only then `listen()` (so the tracer sees CLOSE -> LISTEN).
pub struct BoundSocket {
    fd: std::os::fd::OwnedFd,
    pub port: u16,
}

impl BoundSocket {
    pub fn new(ip: std::net::IpAddr) -> Self {
        use std::os::fd::FromRawFd;
        let family = if ip.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let (storage, len) = sockaddr(std::net::SocketAddr::new(ip, 0));
        // SAFETY: `storage` holds a sockaddr of `len` bytes.
        let rc = unsafe { libc::bind(raw, (&raw const storage).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        // SAFETY: a zeroed sockaddr_storage is valid to fill.
        let mut bound: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut bound_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: out-parameters sized as declared.
        let rc = unsafe { libc::getsockname(raw, (&raw mut bound).cast(), &mut bound_len) };
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        // Both sockaddr_in and sockaddr_in6 keep the port, big-endian, right after the family.
        // SAFETY: the storage is at least 4 bytes long and was filled by the kernel.
        let port = u16::from_be(unsafe { *(&raw const bound).cast::<u16>().add(1) });
        Self { fd, port }
    }

    pub fn listen(self) -> std::net::TcpListener {
        use std::os::fd::AsRawFd;
        // SAFETY: valid socket fd.
        let rc = unsafe { libc::listen(self.fd.as_raw_fd(), 128) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        std::net::TcpListener::from(self.fd)
    }
}

fn sockaddr(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid; it is large enough for either family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Process creation and timed closes exclude each other. A child holds copies of all the test
/// process's file descriptors from `fork()` until its `exec()` closes them (close-on-exec): a
/// socket that a concurrent test closes in that window stays open, and its FIN leaves when the
/// child's `exec()` closes it, late by however long the child took to get there.
static FORKING: RwLock<()> = RwLock::new(());

/// Spawns `cmd` while no [`timed`] close is under way.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let _no_timed_close = FORKING.write().unwrap_or_else(|e| e.into_inner());
    cmd.spawn()
}

/// Spawns `cmd` with [`spawn`] so that it inherits `fds` (at the same numbers, close-on-exec
/// cleared in the child only): the child holds those files, e.g. sockets whose holder a test
/// checks, for as long as it runs, and the caller may close its own copies.
pub fn spawn_holding(
    cmd: &mut Command,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<Child> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the closure runs in the child between fork and exec; it allocates nothing and only
    // calls fcntl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
    spawn(cmd)
}

/// The calling process's `comm` (its main thread's), as `/proc/PID/comm` shows it to others.
pub fn process_comm() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .expect("reading /proc/self/comm")
        .trim_end()
        .to_owned()
}

/// Runs `cmd` to completion (stdin from /dev/null), spawned with [`spawn`], for up to two
/// minutes; panics unless it succeeds, and returns its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    run_checked(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_ok`], failing with an error (saying what `cmd` printed) rather than a panic.
pub fn run_checked(cmd: &mut Command) -> io::Result<Output> {
    const TIMEOUT: Duration = Duration::from_secs(120);
    let child = spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .map_err(|e| io::Error::new(e.kind(), format!("starting {cmd:?}: {e}")))?;
    let (status, stdout, stderr) = collect_output(child, TIMEOUT);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    match status {
        Some(status) if status.success() => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        Some(status) => Err(io::Error::other(format!("{cmd:?}: {status}\n{printed}"))),
        None => Err(io::Error::other(format!(
            "{cmd:?} did not exit within {TIMEOUT:?} (killed); it printed:\n{printed}"
        ))),
    }
}

/// Runs `f`, typically the `drop()` of a socket whose close a test times, while no child process
/// is being created (see [`spawn`]): the close takes effect inside `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> T {
    let _no_fork = FORKING.read().unwrap_or_else(|e| e.into_inner());
    f()
}

/// CLOCK_MONOTONIC in ns: the clock of the kernel's event timestamps (`ts_ns`).
pub fn mono_ns() -> u64 {
    // SAFETY: a zeroed timespec is valid to fill.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: out-parameter of the right type.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`), as `/proc/net/tcp` shows
/// them. A timewait socket shows its substate (FIN_WAIT2 or TIME_WAIT). The numbers are
/// tcpclose-common's (the ABI's one list), as the `u8` that [`tcp_state()`] returns.
pub mod tcp_state {
    use tcpclose_common::tcp_state as abi;

    pub const ESTABLISHED: u8 = narrow(abi::ESTABLISHED);
    pub const SYN_SENT: u8 = narrow(abi::SYN_SENT);
    pub const SYN_RECV: u8 = narrow(abi::SYN_RECV);
    pub const FIN_WAIT1: u8 = narrow(abi::FIN_WAIT1);
    pub const FIN_WAIT2: u8 = narrow(abi::FIN_WAIT2);
    pub const TIME_WAIT: u8 = narrow(abi::TIME_WAIT);
    pub const CLOSE: u8 = narrow(abi::CLOSE);
    pub const CLOSE_WAIT: u8 = narrow(abi::CLOSE_WAIT);
    pub const LAST_ACK: u8 = narrow(abi::LAST_ACK);
    pub const LISTEN: u8 = narrow(abi::LISTEN);
    pub const CLOSING: u8 = narrow(abi::CLOSING);
    pub const NEW_SYN_RECV: u8 = narrow(abi::NEW_SYN_RECV);

    /// A state number as a `u8`, checked at compile time.
    const fn narrow(state: i32) -> u8 {
        assert!(
            state >= 0 && state <= u8::MAX as i32,
            "a TCP state fits a u8"
        );
        state as u8
    }
}

/// The state of the TCP socket (full or timewait) with this local and remote address, in the
/// calling thread's network namespace (`/proc/thread-self/net/tcp` or `tcp6`); `None` when
/// there is none (never was, or gone).
pub fn tcp_state(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u8> {
    tcp_sockets(local.is_ipv4())
        .into_iter()
        .find_map(|(l, r, state)| (l == local && r == remote).then_some(state))
}

/// Every TCP socket (full or timewait) of one family in the calling thread's network namespace,
/// as `(local, remote, state)`.
pub fn tcp_sockets(ipv4: bool) -> Vec<(std::net::SocketAddr, std::net::SocketAddr, u8)> {
    let file = if ipv4 { "tcp" } else { "tcp6" };
    let table = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
        .unwrap_or_else(|e| panic!("reading /proc/thread-self/net/{file}: {e}"));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let l = proc_net_addr(fields.next()?)?;
            let r = proc_net_addr(fields.next()?)?;
            let state = u8::from_str_radix(fields.next()?, 16).ok()?;
            Some((l, r, state))
        })
        .collect()
}

/// `0100007F:9C40` (IPv4) or 32 hex digits and a port (IPv6), as `/proc/net/tcp{,6}` print them:
/// each 32-bit word of the address in network order, printed as a host-order number.
fn proc_net_addr(field: &str) -> Option<std::net::SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// Connects to `remote` from a socket made in the calling thread's network namespace, with
/// `SO_REUSEADDR` if `reuse_addr`, bound first to `local_port` on `remote`'s address if given
/// (which makes the kernel kill a timewait socket with the same 4-tuple, when it may).
pub fn connect_with(
    remote: std::net::SocketAddr,
    local_port: Option<u16>,
    reuse_addr: bool,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let family = if remote.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    if reuse_addr {
        set_int_option(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    if let Some(port) = local_port {
        let (storage, len) = sockaddr(std::net::SocketAddr::new(remote.ip(), port));
        // SAFETY: `storage` holds a sockaddr of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (storage, len) = sockaddr(remote);
    // SAFETY: `storage` holds a sockaddr of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::net::TcpStream::from(fd))
}

/// Whether the running kernel says why it sends a reset (`enum sk_rst_reason`, passed by
/// `tcp:tcp_send_reset` since Linux 6.10): the records' `reset.reason` is null before.
pub fn kernel_gives_reset_reasons() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("reading /proc/sys/kernel/osrelease");
    let mut numbers = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    version >= (6, 10)
}

/// `SO_LINGER {on, 0}`: the next close() aborts the connection with an RST.
pub fn set_linger_zero(socket: &impl std::os::fd::AsFd) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and an option value of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

fn set_int_option(
    socket: &impl std::os::fd::AsFd,
    level: i32,
    name: i32,
    value: i32,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid socket fd and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An HTTP answer: status code, header lines (`Name: value`, as sent) and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<String>,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// `GET target` (a path with its query string, already percent-encoded) from `addr`, as
/// HTTP/1.0: the server closes the connection after the answer, whose body is never chunked.
/// Errors are those of connecting (e.g. `ConnectionRefused`), of the exchange (within
/// `timeout`), or a malformed answer.
pub fn http_get(
    addr: std::net::SocketAddr,
    target: &str,
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    use std::io::Write as _;
    let malformed = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {target} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: tcpclose-tests\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).map_err(|_| malformed("answer is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| malformed("answer without an end of headers"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| malformed("answer without a status code"))?;
    Ok(HttpResponse {
        status,
        headers: lines.map(str::to_owned).collect(),
        body: body.to_owned(),
    })
}

/// A TCP port free on 127.0.0.1 right now (bound, read, released: another process could take it
/// before the caller does, which only makes the caller's bind fail loudly).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}
